//! Credentials: password hashing, session tokens and API keys. Pure functions over secrets;
//! deciding *who may do what* happens in `api::caller` against the database.

pub mod api_key;
pub mod jwt;
pub mod password;
