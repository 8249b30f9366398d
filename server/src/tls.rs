//! TLS for the server: the certificate and key it presents, the CA it trusts
//! for client certificates (mutual TLS), and how long a handshake may take.
//!
//! tonic does the TLS itself (rustls with the ring provider, HTTP/2 by ALPN).
//! Each accepted connection is handshaken in a task of its own, so a client
//! that stalls mid-handshake never blocks the accept loop; such a client is
//! cut off after [`TlsConfig::handshake_timeout`] (tonic's own default is no
//! limit), and until then it holds one of the `--max-connections` slots, so
//! stalled handshakes are bounded in number and in time.

use std::{fmt, path::Path, time::Duration};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The default for [`TlsConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A file cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file: "certificate", "private key", "client CA".
        what: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The PEM data holds nothing usable.
    #[error("{0}")]
    Invalid(String),
}

/// The server's TLS settings. `Debug` never shows the private key.
///
/// ```no_run
/// # fn run() -> Result<(), jobd::tls::TlsConfigError> {
/// use std::path::Path;
/// let tls = jobd::tls::TlsConfig::from_files(
///     Path::new("server.pem"),
///     Path::new("server.key"),
///     Some(Path::new("clients-ca.pem")), // mutual TLS; None for server-only TLS
/// )?;
/// let security = jobd::Security { tls: Some(tls), ..Default::default() };
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
    /// CA certificates (PEM) that client certificates must chain to; when
    /// set, a client without such a certificate cannot connect.
    pub client_ca_pem: Option<Vec<u8>>,
    /// How long a client may take to complete the TLS handshake before its
    /// connection is closed.
    pub handshake_timeout: Duration,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mutual", &self.client_ca_pem.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads the PEM files and checks that they make a usable configuration,
    /// with the default handshake timeout.
    ///
    /// # Errors
    ///
    /// [`TlsConfigError`] naming the file, or saying what is wrong with the
    /// certificate and key.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Self, TlsConfigError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| TlsConfigError::Read {
                what,
                path: path.display().to_string(),
                source,
            })
        };
        let config = Self {
            cert_pem: read("certificate", cert)?,
            key_pem: read("private key", key)?,
            client_ca_pem: client_ca.map(|path| read("client CA", path)).transpose()?,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        };
        config.check()?;
        warn_if_world_readable(key);
        Ok(config)
    }

    /// Checks that rustls accepts the certificate, key and client CA (a key
    /// that does not match the certificate, or PEM without a certificate, is
    /// refused here rather than on the first connection).
    ///
    /// # Errors
    ///
    /// [`TlsConfigError::Invalid`].
    pub fn check(&self) -> Result<(), TlsConfigError> {
        if let Some(ca) = &self.client_ca_pem
            && !String::from_utf8_lossy(ca).contains("-----BEGIN CERTIFICATE-----")
        {
            return Err(TlsConfigError::Invalid(
                "the client CA file holds no PEM certificate".to_owned(),
            ));
        }
        tonic::transport::Server::builder()
            .tls_config(self.server_config())
            .map(drop)
            .map_err(|error| {
                let mut message = error.to_string();
                let mut cause = std::error::Error::source(&error);
                while let Some(inner) = cause {
                    message = format!("{message}: {inner}");
                    cause = inner.source();
                }
                TlsConfigError::Invalid(format!(
                    "the TLS certificate and key are not usable: {message}"
                ))
            })
    }

    /// The configuration in tonic's terms.
    pub(crate) fn server_config(&self) -> ServerTlsConfig {
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(self.handshake_timeout);
        if let Some(ca) = &self.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        config
    }
}

/// A private key every local user can read is worth a warning, not a
/// refusal: secret volumes (e.g. Kubernetes' default mode 0644) often look
/// like that inside a container where nobody else runs.
fn warn_if_world_readable(key: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(key)
            && meta.permissions().mode() & 0o004 != 0
        {
            tracing::warn!(
                key = %key.display(),
                "the TLS private key is readable by every user; consider chmod 600"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = key;
}
