use std::fmt;

/// Everything that can go wrong when computing a loss or a metric.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An argument was rejected before any computation; `argument` names it.
    InvalidArgument {
        argument: &'static str,
        message: String,
    },
    /// libtorch itself reported an error.
    Torch(String),
}

impl Error {
    pub(crate) fn invalid(argument: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            argument,
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { argument, message } => write!(f, "{argument}: {message}"),
            Error::Torch(message) => write!(f, "libtorch error: {message}"),
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
}
