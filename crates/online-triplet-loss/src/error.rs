use std::fmt;

use tch::Kind;

/// Everything that can go wrong when computing a loss or a metric.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An argument was rejected before any computation; `argument` names it.
    InvalidArgument {
        /// The name of the argument at fault, as the function's signature
        /// (or, for a setting, the builder method) spells it.
        argument: &'static str,
        /// Why it was rejected, quoting the value where it is short.
        message: String,
    },
    /// libtorch itself reported an error.
    Torch(String),
    /// The caller's [`crate::Interrupt`] asked to stop.
    Interrupted,
    /// A buffer of the native CPU kernels (not a tensor: libtorch reports
    /// those as [`Error::Torch`]) could not be allocated.
    OutOfMemory {
        /// The size that was asked for.
        bytes: usize,
    },
}

impl Error {
    pub(crate) fn invalid(argument: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            argument,
            message: message.into(),
        }
    }
}

/// torch's name of a dtype (`torch.int64` is `int64`), for messages that
/// Python users read as well as Rust users.
pub(crate) fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Uint8 => "uint8",
        Kind::Int8 => "int8",
        Kind::Int16 => "int16",
        Kind::Int => "int32",
        Kind::Int64 => "int64",
        Kind::Half => "float16",
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::BFloat16 => "bfloat16",
        Kind::ComplexHalf => "complex32",
        Kind::ComplexFloat => "complex64",
        Kind::ComplexDouble => "complex128",
        Kind::Bool => "bool",
        Kind::QInt8 => "qint8",
        Kind::QUInt8 => "quint8",
        Kind::QInt32 => "qint32",
        Kind::Float8e5m2 => "float8_e5m2",
        Kind::Float8e4m3fn => "float8_e4m3fn",
        Kind::Float8e5m2fnuz => "float8_e5m2fnuz",
        Kind::Float8e4m3fnuz => "float8_e4m3fnuz",
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { argument, message } => write!(f, "{argument}: {message}"),
            Error::Torch(message) => write!(f, "libtorch error: {message}"),
            Error::Interrupted => f.write_str("interrupted at the caller's request"),
            Error::OutOfMemory { bytes } => write!(
                f,
                "out of host memory: a buffer of at least {bytes} bytes could not be allocated"
            ),
        }
    }
}

impl std::error::Error for Error {}

impl From<tch::TchError> for Error {
    fn from(err: tch::TchError) -> Self {
        match err {
            tch::TchError::Torch(message) => Error::Torch(without_backtrace(&message).to_owned()),
            other => Error::Torch(other.to_string()),
        }
    }
}

impl Error {
    /// The error in a panic of tch's: its operations that take a scalar
    /// (tch 0.24 and 0.26) panic when libtorch fails, because the scalar, dropped
    /// before the operation returns, finds libtorch's error and unwraps it.
    /// The panic's message quotes the error with `{:?}`:
    /// ``called `Result::unwrap()` on an `Err` value: Torch("...")``. `None`
    /// for any other panic message.
    pub fn from_tch_panic(message: &str) -> Option<Error> {
        const QUOTED: &str = "called `Result::unwrap()` on an `Err` value: Torch(\"";
        let start = message.find(QUOTED)? + QUOTED.len();
        // Undo `{:?}`'s escapes up to the closing quote.
        let mut text = String::new();
        let mut chars = message[start..].chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => text.push('\n'),
                    't' => text.push('\t'),
                    'r' => text.push('\r'),
                    '0' => text.push('\0'),
                    'u' => {
                        let code: String =
                            chars.by_ref().skip(1).take_while(|&c| c != '}').collect();
                        text.push(
                            u32::from_str_radix(&code, 16)
                                .ok()
                                .and_then(char::from_u32)?,
                        );
                    }
                    other => text.push(other),
                },
                c => text.push(c),
            }
        }
        Some(Error::Torch(without_backtrace(&text).to_owned()))
    }
}

/// Runs `f`, turning a panic of tch's on a libtorch failure into the `Err`
/// it carries ([`Error::from_tch_panic`]); any other panic goes on. tch's
/// operations that take a number (`f_add_scalar`, `f_where_scalarother`,
/// `f_full`, …) free it after the call and before they read libtorch's
/// error, and the free reads it first and panics (tch 0.24 to 0.26), so an
/// out-of-memory error there would reach the caller as a panic. Used at the
/// crate's public functions. The panic hook still runs (the default prints
/// the message).
pub(crate) fn caught<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied());
            match message.and_then(Error::from_tch_panic) {
                Some(err) => Err(err),
                None => std::panic::resume_unwind(panic),
            }
        }
    }
}

/// libtorch's message without the C++ stack that its errors carry after it,
/// as torch's Python errors show it.
pub(crate) fn without_backtrace(message: &str) -> &str {
    ["\nException raised from ", "\nframe #"]
        .iter()
        .filter_map(|marker| message.find(marker))
        .min()
        .map_or(message, |end| &message[..end])
        .trim_end()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_errors_lose_their_cpp_stack() {
        // A real libtorch error: indices out of range.
        let t = tch::Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu));
        let index = tch::Tensor::from_slice(&[5i64]);
        let err: Error = t.f_index_select(0, &index).unwrap_err().into();
        let Error::Torch(message) = err else {
            panic!("expected Error::Torch, got {err:?}")
        };
        assert!(message.contains("out of range"), "{message}");
        for leak in ["frame #", "Exception raised from", "Internal torch error"] {
            assert!(!message.contains(leak), "{message}");
        }
        assert_eq!(without_backtrace("a\nframe #0: b"), "a");
        assert_eq!(
            without_backtrace("a\nException raised from b\nframe #0"),
            "a"
        );
        assert_eq!(without_backtrace("no stack"), "no stack");
    }

    #[test]
    fn a_failure_of_a_tch_operation_that_takes_a_number_is_an_err() {
        let full = || {
            Ok(tch::Tensor::f_full(
                [-1],
                0.5,
                (tch::Kind::Float, tch::Device::Cpu),
            )?)
        };
        let Err(Error::Torch(message)) = caught(full) else {
            panic!("expected Error::Torch")
        };
        assert!(message.contains("-1"), "{message}");
        assert_eq!(caught(|| Ok(3)), Ok(3));
        assert_eq!(
            caught::<()>(|| Err(Error::Interrupted)),
            Err(Error::Interrupted)
        );
        // Any other panic goes on.
        let other = std::panic::catch_unwind(|| caught::<()>(|| panic!("not tch's")));
        assert!(other.is_err());
    }

    #[test]
    fn the_error_in_a_tch_scalar_panic_is_recovered() {
        // A real one: `full` takes its fill value as a scalar.
        let panic = std::panic::catch_unwind(|| {
            tch::Tensor::f_full([-1], 0.5, (tch::Kind::Float, tch::Device::Cpu))
        })
        .unwrap_err();
        let message = panic
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        let Some(Error::Torch(text)) = Error::from_tch_panic(message) else {
            panic!("not recovered from {message:?}")
        };
        assert!(text.contains("-1"), "{text}");
        assert!(!text.contains("frame #") && !text.contains('\\'), "{text}");
        // Every escape, a quote before a parenthesis, and the stack after it.
        let quoted = "a \"b\") c\td\\e\nf \u{e9}\nframe #0: g";
        let message = format!(
            "called `Result::unwrap()` on an `Err` value: {:?}",
            tch::TchError::Torch(quoted.into())
        );
        assert_eq!(
            Error::from_tch_panic(&message),
            Some(Error::Torch("a \"b\") c\td\\e\nf \u{e9}".into()))
        );
        assert_eq!(Error::from_tch_panic("index out of bounds"), None);
    }
}
