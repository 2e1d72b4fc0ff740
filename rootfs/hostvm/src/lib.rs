//! Host VM rig (filled by the foundation issue).
