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
        Error::Torch(err.to_string())
    }
}
