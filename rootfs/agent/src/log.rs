//! Console messages. Each line starts with `roost-agent: `; boot-time console output is slow on
//! emulated serial ports, so init prints as few lines as it can.

/// Prints one `roost-agent: ...` line to stderr (the console, when PID 1).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("roost-agent: {}", format_args!($($arg)*))
    };
}
