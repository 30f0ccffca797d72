//! Error types. Every failure a user can cause or meet (no adapter, a driver fault, a bad
//! file, an impossible shape) comes back as one of these, never as a panic.

use std::path::PathBuf;

/// Failures of the GPU layer: adapter choice, device faults, shader compilation, limits.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No adapter at all (or none that can run compute shaders).
    #[error(
        "no GPU adapter that can run compute shaders was found{detail}. \
         On Linux without a GPU, install Mesa's software Vulkan driver: \
         `apt-get install -y mesa-vulkan-drivers libvulkan1` (Debian/Ubuntu) or \
         `dnf install mesa-vulkan-drivers` (Fedora); `prism info` lists what wgpu sees"
    )]
    NoAdapter { detail: String },

    /// `WGPU_ADAPTER_NAME` (or `--adapter`) matched nothing.
    #[error("no adapter name contains {wanted:?}; available: {available}")]
    AdapterNotFound { wanted: String, available: String },

    /// The adapter refused to open a device.
    #[error("could not open a device on {adapter}: {message}")]
    RequestDevice { adapter: String, message: String },

    /// The device ran out of memory.
    #[error(
        "GPU out of memory while {context}. Lower the batch size or the model size, \
         or close other programs that use the GPU"
    )]
    OutOfMemory { context: String },

    /// wgpu rejected a call: a bug in prism or in its input validation; please report it.
    #[error("GPU validation error while {context}: {message}")]
    Validation { context: String, message: String },

    /// A driver-internal failure.
    #[error("GPU internal error while {context}: {message}")]
    Internal { context: String, message: String },

    /// The device was lost (driver reset, GPU removed, timeout detection).
    #[error(
        "the GPU device was lost ({reason}): {message}. Restart the program; \
         a checkpointed run resumes with `prism train --resume`"
    )]
    DeviceLost { reason: String, message: String },

    /// A shader failed to render from its template, parse, or validate.
    #[error("shader {name} failed to build: {message}")]
    Shader { name: String, message: String },

    /// A single binding would exceed the adapter's storage-buffer binding limit.
    #[error(
        "{what} needs {bytes} bytes in one storage binding but this adapter allows at most \
         {limit}; use a smaller batch or model"
    )]
    BindingTooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },

    /// A buffer larger than the adapter's maximum buffer size was requested.
    #[error("{what} needs a {bytes}-byte buffer but this adapter allows at most {limit}")]
    BufferTooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },

    /// Waiting for the GPU failed (timeout or a lost device).
    #[error("waiting for the GPU failed: {0}")]
    Poll(String),

    /// Reading a buffer back failed.
    #[error("reading a GPU buffer back failed: {0}")]
    Map(String),
}

/// The library's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gpu(#[from] GpuError),

    /// Arguments that cannot describe a valid computation (shapes, sizes, options).
    #[error("invalid argument: {0}")]
    Invalid(String),

    /// Input data (a dataset, a model file, a checkpoint, an upload) is malformed.
    #[error("{path}: {message}")]
    Format { path: String, message: String },

    /// Data that the program could not find or fetch.
    #[error("{0}")]
    DataNotFound(String),

    /// An I/O failure with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: msg.into(),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The `prism` command's exit status for this error: 2 for a usage error (an invalid
    /// argument or configuration; clap's own parse errors exit 2 too), 3 for a data error (a
    /// file that is missing, unreadable or malformed, data that cannot be found), 4 for a GPU
    /// error (no adapter, device lost, out of memory, a shader or driver failure).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Invalid(_) => 2,
            Error::Format { .. } | Error::DataNotFound(_) | Error::Io { .. } => 3,
            Error::Gpu(_) => 4,
        }
    }
}

/// Result with the library's error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
