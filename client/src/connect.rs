//! How a client reaches a server: the address (a bare `host:port` means
//! `http://`), and for a server that wants more than plaintext, TLS (a CA
//! to trust, a client certificate for mutual TLS) and a bearer token sent
//! with every call. [`ConnectOptions`] collects them; [`CallCredentials`] is
//! the interceptor that puts the token on each request.

use std::fmt;

use tonic::{
    metadata::{AsciiMetadataValue, MetadataValue},
    service::Interceptor,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

use crate::Error;

/// Options for [`JobClient::connect_with`](crate::JobClient::connect_with).
/// `Debug` never shows the token or the private key.
///
/// TLS is used for `https://` addresses. The server's certificate is checked
/// against [`ca_certificate_pem`](Self::ca_certificate_pem) when given, else
/// against the system's trusted roots.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use jobd_client::{ConnectOptions, JobClient};
///
/// let options = ConnectOptions::new()
///     .ca_certificate_pem(std::fs::read("ca.pem")?)
///     .bearer_token(std::env::var("JOBD_TOKEN")?);
/// let client = JobClient::connect_with("https://jobd.example:50051", options).await?;
/// let job = client.submit("hello", serde_json::json!("Ann")).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct ConnectOptions {
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    token: Option<String>,
    domain: Option<String>,
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("ca_certificate", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .field("bearer_token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls_domain", &self.domain)
            .finish()
    }
}

impl ConnectOptions {
    /// No TLS settings and no token: the same as [`JobClient::connect`](crate::JobClient::connect).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CA certificates in `pem` (instead of the system's roots)
    /// for the server's certificate.
    #[must_use]
    pub fn ca_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents this certificate and private key (both PEM) to a server that
    /// requires client certificates (mutual TLS).
    #[must_use]
    pub fn client_identity_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Sends `authorization: Bearer TOKEN` with every call.
    #[must_use]
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Checks the server's certificate for this name instead of the
    /// address's host (e.g. when connecting by IP address).
    #[must_use]
    pub fn tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// The endpoint for `addr` with these TLS settings, for callers that
    /// open their own channels (e.g. several separate connections) and wrap
    /// them with [`JobClient::from_channel_with`](crate::JobClient::from_channel_with).
    ///
    /// ```
    /// let options = jobd_client::ConnectOptions::new().bearer_token("a-token-of-16-bytes-or-more");
    /// let endpoint = options.endpoint("127.0.0.1:50051")?;
    /// assert_eq!(endpoint.uri().scheme_str(), Some("http"));
    /// let credentials = options.credentials()?;
    /// # Ok::<(), jobd_client::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`] or [`Error::InvalidOptions`].
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, Error> {
        self.configure(endpoint_for(addr)?)
    }

    /// Applies the TLS settings to `endpoint` (only for `https://`).
    pub(crate) fn configure(&self, endpoint: Endpoint) -> Result<Endpoint, Error> {
        let https = endpoint.uri().scheme_str() == Some("https");
        if !https {
            if self.ca_pem.is_some() || self.identity.is_some() || self.domain.is_some() {
                return Err(Error::InvalidOptions(
                    "TLS settings (CA, client certificate, domain) need an https:// address"
                        .to_owned(),
                ));
            }
            return Ok(endpoint);
        }
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_pem {
            Some(pem) => {
                if !String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(Error::InvalidOptions(
                        "the CA certificate is not a PEM certificate".to_owned(),
                    ));
                }
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| Error::InvalidOptions(format!("TLS settings: {}", one_line(&e))))
    }

    /// The interceptor that sends the token, if any.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOptions`] for an empty token or one that cannot be
    /// sent as a header.
    pub fn credentials(&self) -> Result<CallCredentials, Error> {
        let Some(token) = &self.token else {
            return Ok(CallCredentials::none());
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::InvalidOptions(
                "the bearer token is empty".to_owned(),
            ));
        }
        let invalid = || {
            Error::InvalidOptions(
                "the bearer token may only hold visible ASCII characters".to_owned(),
            )
        };
        // HTTP would also take bytes above 0x7f; jobd's tokens never have them.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid());
        }
        let mut value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| invalid())?;
        // Never indexed by HPACK, and hidden by http's Debug.
        value.set_sensitive(true);
        Ok(CallCredentials {
            authorization: Some(value),
        })
    }
}

/// The interceptor every [`JobClient`](crate::JobClient) call goes through:
/// adds the bearer token, when there is one. `Debug` shows whether there is
/// a token, never the token.
#[derive(Clone)]
pub struct CallCredentials {
    authorization: Option<AsciiMetadataValue>,
}

impl CallCredentials {
    /// No token: calls go out as they are.
    #[must_use]
    pub fn none() -> Self {
        Self {
            authorization: None,
        }
    }
}

impl fmt::Debug for CallCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallCredentials")
            .field(
                "bearer_token",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Interceptor for CallCredentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Builds the endpoint for `addr`, adding `http://` to a bare `host:port`.
fn endpoint_for(addr: &str) -> Result<Endpoint, Error> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let invalid = |reason: String| Error::InvalidAddress {
        addr: addr.to_owned(),
        reason,
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| invalid(e.to_string()))?;
    if endpoint.uri().host().is_none() {
        return Err(invalid("no host".to_owned()));
    }
    // Small RPCs: do not let Nagle delay requests.
    Ok(endpoint.tcp_nodelay(true))
}

/// An error and its causes on one line (tonic's TLS errors hide the useful
/// part in a source).
pub(crate) fn one_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        line = format!("{line}: {inner}");
        cause = inner.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_host_port_gets_a_scheme() {
        assert_eq!(
            endpoint_for("127.0.0.1:50051").unwrap().uri().to_string(),
            "http://127.0.0.1:50051/"
        );
        assert!(endpoint_for("http://[::1]:1").is_ok());
        assert!(matches!(
            endpoint_for("http://"),
            Err(Error::InvalidAddress { .. })
        ));
    }

    #[test]
    fn debug_hides_secrets() {
        let options = ConnectOptions::new()
            .bearer_token("secret-token-value-123")
            .client_identity_pem("CERT", "PRIVATE KEY BYTES");
        let shown = format!("{options:?} {:?}", options.credentials().unwrap());
        assert!(!shown.contains("secret-token"), "{shown}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn the_token_goes_in_the_authorization_header() {
        let mut credentials = ConnectOptions::new()
            .bearer_token(" abc \n")
            .credentials()
            .unwrap();
        let request = credentials.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer abc"
        );
        let mut none = CallCredentials::none();
        let request = none.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn bad_options_are_refused_before_connecting() {
        assert!(matches!(
            ConnectOptions::new().bearer_token("  ").credentials(),
            Err(Error::InvalidOptions(_))
        ));
        assert!(matches!(
            ConnectOptions::new().bearer_token("tök").credentials(),
            Err(Error::InvalidOptions(_))
        ));
        let plain = Endpoint::from_static("http://127.0.0.1:1");
        assert!(matches!(
            ConnectOptions::new()
                .ca_certificate_pem("x")
                .configure(plain),
            Err(Error::InvalidOptions(_))
        ));
        let https = Endpoint::from_static("https://127.0.0.1:1");
        assert!(matches!(
            ConnectOptions::new()
                .ca_certificate_pem("not pem")
                .configure(https),
            Err(Error::InvalidOptions(_))
        ));
    }
}
