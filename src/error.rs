//! The one error type of the library. Each error carries a kind, which decides the CLI exit
//! code and the errno the mount and the control files answer, and a one-line human message.
//! Messages never contain key material.

use std::fmt;

/// What went wrong, coarse enough to map onto an errno and an exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed request or argument (EINVAL, exit 2).
    InvalidInput,
    /// No such key or resource (ENOENT, exit 3).
    NotFound,
    /// The destination already exists (EEXIST, exit 4).
    AlreadyExists,
    /// Refused by a product rule (EPERM, exit 5).
    Refused,
    /// The key cannot be used: disabled, pending deletion, pending import, destroyed (EACCES, exit 6).
    KeyUnusable,
    /// The resource or store is in use (EBUSY, exit 7).
    Busy,
    /// Stored data is damaged or does not authenticate (EIO, exit 8).
    Corrupt,
    /// No room: the store's filesystem is full or cannot hold the file, or a write past the
    /// end of a resource (ENOSPC, exit 9).
    NoSpace,
    /// The operating system refused access to a file or directory (EACCES, exit 5).
    Denied,
    /// A write to something read-only (EROFS, exit 5).
    ReadOnly,
    /// A file operation on a directory (EISDIR, exit 2).
    IsDir,
    /// A directory operation on a file (ENOTDIR, exit 2).
    NotDir,
    /// A stale or misused file handle (EBADF, exit 2).
    BadHandle,
    /// An operating-system I/O error (EIO or its own errno, exit 9).
    Io,
    /// Stopped because the user asked (ECANCELED, exit 130, as for Ctrl-C).
    Cancelled,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::InvalidInput,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Refused,
        ErrorKind::KeyUnusable,
        ErrorKind::Busy,
        ErrorKind::Corrupt,
        ErrorKind::NoSpace,
        ErrorKind::Denied,
        ErrorKind::ReadOnly,
        ErrorKind::IsDir,
        ErrorKind::NotDir,
        ErrorKind::BadHandle,
        ErrorKind::Io,
        ErrorKind::Cancelled,
    ];

    /// The kind an errno stands for (the inverse of [`ErrorKind::errno`]; EACCES is taken as
    /// a key refusal, the way jobs fail with it).
    pub fn from_errno(n: i32) -> ErrorKind {
        match n {
            libc::EACCES => ErrorKind::KeyUnusable,
            libc::EIO => ErrorKind::Corrupt,
            n => Self::ALL
                .into_iter()
                .find(|k| k.errno() == n)
                .unwrap_or(ErrorKind::Io),
        }
    }

    /// Inverse of the `Debug` name (`"NotFound"`), for errors passed between processes.
    pub fn from_name(s: &str) -> Option<ErrorKind> {
        Self::ALL.into_iter().find(|k| format!("{k:?}") == s)
    }

    /// The errno the mount and control files answer with.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::InvalidInput => libc::EINVAL,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::AlreadyExists => libc::EEXIST,
            ErrorKind::Refused => libc::EPERM,
            ErrorKind::KeyUnusable => libc::EACCES,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Corrupt => libc::EIO,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Denied => libc::EACCES,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::IsDir => libc::EISDIR,
            ErrorKind::NotDir => libc::ENOTDIR,
            ErrorKind::BadHandle => libc::EBADF,
            ErrorKind::Io => libc::EIO,
            ErrorKind::Cancelled => libc::ECANCELED,
        }
    }

    /// The CLI exit code.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::InvalidInput => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::AlreadyExists => 4,
            ErrorKind::Refused => 5,
            ErrorKind::KeyUnusable => 6,
            ErrorKind::Busy => 7,
            ErrorKind::Corrupt => 8,
            ErrorKind::NoSpace | ErrorKind::Io => 9,
            ErrorKind::ReadOnly | ErrorKind::Denied => 5,
            ErrorKind::IsDir | ErrorKind::NotDir | ErrorKind::BadHandle => 2,
            ErrorKind::Cancelled => 130,
        }
    }
}

/// An error: a kind and a one-line message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// The raw OS errno, for `Io` errors that came from the kernel.
    pub os_errno: Option<i32>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            os_errno: None,
        }
    }

    /// The errno to answer with: the OS one if the kernel gave one, else the kind's.
    pub fn errno(&self) -> i32 {
        self.os_errno.unwrap_or_else(|| self.kind.errno())
    }

    /// Prefix the message with context, keeping kind and errno.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let kind = match (e.kind(), e.raw_os_error()) {
            (std::io::ErrorKind::NotFound, _) => ErrorKind::NotFound,
            (std::io::ErrorKind::AlreadyExists, _) => ErrorKind::AlreadyExists,
            (std::io::ErrorKind::InvalidInput, _) => ErrorKind::InvalidInput,
            (std::io::ErrorKind::PermissionDenied, _) => ErrorKind::Denied,
            (_, Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)) => ErrorKind::NoSpace,
            (_, Some(libc::EROFS)) => ErrorKind::ReadOnly,
            (_, Some(libc::ENOTDIR)) => ErrorKind::NotDir,
            (_, Some(libc::EISDIR)) => ErrorKind::IsDir,
            (_, Some(libc::ENAMETOOLONG)) => ErrorKind::InvalidInput,
            (_, Some(libc::ELOOP)) => ErrorKind::Corrupt,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            message: e.to_string(),
            os_errno: e.raw_os_error(),
        }
    }
}

impl From<crate::crypto::CryptoError> for Error {
    fn from(e: crate::crypto::CryptoError) -> Self {
        let kind = match e {
            crate::crypto::CryptoError::Auth => ErrorKind::Corrupt,
            _ => ErrorKind::InvalidInput,
        };
        Error::new(kind, e.to_string())
    }
}

/// Shorthand constructors: `err!(NotFound, "no key {id}")`.
#[macro_export]
macro_rules! err {
    ($kind:ident, $($arg:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*))
    };
}

/// Attach a path to I/O errors.
pub trait IoContext<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::from(e).context(what))
    }
}
