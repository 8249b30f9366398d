//! Bearer-token authentication and read/write authorization for
//! `jobd.v1.JobService`, in one tower layer (`Authenticated`) that
//! `server.rs` wraps around the whole service, so every method, including
//! ones added later, passes through the same check.
//!
//! Tokens come from a file (`jobd --auth-token-file`, see [`TokenSet`] for
//! the format). A call must carry `authorization: Bearer <token>`; a missing,
//! malformed or unknown token is answered `UNAUTHENTICATED`, a read-only token
//! calling a method that changes state `PERMISSION_DENIED`. Methods are
//! classified by their gRPC path, and a JobService method this module does not
//! list needs write access: deny by default.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time
//! against every known token without an early exit, so neither a token's
//! content nor its length leaks through timing; no `Debug` output or log line
//! shows a token.

use std::{
    collections::HashSet,
    convert::Infallible,
    fmt,
    path::Path,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use sha2::{Digest as _, Sha256};
use subtle::{ConditionallySelectable as _, ConstantTimeEq as _};
use tonic::{Status, server::NamedService};

/// The shortest token the server accepts, in bytes: shorter ones are
/// guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// The longest token the server accepts, in bytes (it must fit in a header).
pub const MAX_TOKEN_LEN: usize = 1024;

/// What a token allows. A token has exactly one of these capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Access {
    /// Questions only: `Done`, `Result`, `GetJob`, `ListJobs`, `Wait`,
    /// `ListFunctions`, `Watch`, `ListWorkers`.
    ReadOnly,
    /// Every JobService method, including `Submit`, `SubmitBatch`,
    /// `Cancel`, `DeleteJob`, `Map`.
    ReadWrite,
    /// Attaching remote workers (`WorkerService`), and nothing else: a
    /// worker's token cannot submit, list or read jobs, and a client's
    /// token cannot attach a worker.
    Worker,
}

/// The access a `jobd.v1.JobService` method needs, by its name. An unknown
/// method needs [`Access::ReadWrite`]: a method added to the service without
/// being listed here is closed to read-only tokens, never open.
///
/// ```
/// use jobd::auth::{Access, required_access};
/// assert_eq!(required_access("GetJob"), Access::ReadOnly);
/// assert_eq!(required_access("Submit"), Access::ReadWrite);
/// assert_eq!(required_access("SomethingNew"), Access::ReadWrite);
/// ```
#[must_use]
pub fn required_access(method: &str) -> Access {
    match method {
        "Done" | "Result" | "GetJob" | "ListJobs" | "Wait" | "ListFunctions" | "Watch"
        | "ListWorkers" => Access::ReadOnly,
        "Submit" | "SubmitBatch" | "Cancel" | "DeleteJob" | "Map" => Access::ReadWrite,
        _ => Access::ReadWrite,
    }
}

/// Why a token file was refused. Every variant names the file and, where
/// there is one, the line (never the token itself).
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Anyone on the machine could read the tokens.
    #[error(
        "{path} is readable by every user (mode {mode:o}); make it private, e.g. chmod 600 {path}"
    )]
    WorldReadable {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// A line is malformed.
    #[error("{path} line {line}: {reason}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The file holds no token.
    #[error("{path} holds no token (one per line: TOKEN [name=NAME] [readonly])")]
    Empty {
        /// The file.
        path: String,
    },
}

/// One accepted token: its digest, never the token itself.
#[derive(Clone)]
struct Entry {
    digest: [u8; 32],
    name: String,
    access: Access,
}

/// The tokens a server accepts, loaded from a token file.
///
/// The file has one token per line, optionally followed by attributes:
///
/// ```text
/// # comments and blank lines are ignored
/// 3f9c1e0b7a2d4c58e6f1a9b0c3d2e4f5            name=ci
/// 9a8b7c6d5e4f30211f2e3d4c5b6a7988 name=dashboard readonly
/// ```
///
/// A token is 16 to 1024 visible ASCII characters without spaces (e.g.
/// `openssl rand -hex 32`); `name=NAME` names it in logs (default:
/// `line-N`); `readonly` limits it to the methods that change nothing.
///
/// ```
/// let tokens = jobd::auth::TokenSet::parse(
///     "tokens",
///     "0123456789abcdef0123 name=ci\n# a comment\nfedcba9876543210fedc readonly\n",
/// )?;
/// assert_eq!(tokens.len(), 2);
/// // Debug output names tokens but never shows them.
/// assert!(!format!("{tokens:?}").contains("0123456789abcdef"));
/// # Ok::<(), jobd::auth::TokenFileError>(())
/// ```
///
/// The set can be replaced in place ([`TokenSet::replace_with`]), which is
/// how `jobd` reloads its token file on SIGHUP: calls already checked keep
/// their answer, later calls see the new tokens.
pub struct TokenSet {
    entries: RwLock<Arc<Vec<Entry>>>,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.snapshot()
                    .iter()
                    .map(|e| format!("{} ({:?}, token redacted)", e.name, e.access)),
            )
            .finish()
    }
}

impl TokenSet {
    /// Reads and checks a token file. On Unix a file that every user may
    /// read is refused.
    ///
    /// # Errors
    ///
    /// [`TokenFileError`] naming the file and line.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let shown = path.display().to_string();
        let read = |source| TokenFileError::Read {
            path: shown.clone(),
            source,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
            if mode & 0o004 != 0 {
                return Err(TokenFileError::WorldReadable {
                    path: shown,
                    mode: mode & 0o777,
                });
            }
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::parse(&shown, &text)
    }

    /// Parses the text of a token file; `path` is only used in errors.
    ///
    /// # Errors
    ///
    /// [`TokenFileError::Line`] for a malformed line, a short or duplicate
    /// token, a duplicate name or an unknown attribute;
    /// [`TokenFileError::Empty`] when there is no token at all.
    pub fn parse(path: &str, text: &str) -> Result<Self, TokenFileError> {
        let mut entries = Vec::new();
        let mut names = HashSet::new();
        let mut digests = HashSet::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let bad = |reason: String| TokenFileError::Line {
                path: path.to_owned(),
                line,
                reason,
            };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let mut words = trimmed.split_whitespace();
            let token = words.next().unwrap_or_default();
            if token.len() < MIN_TOKEN_LEN {
                return Err(bad(format!(
                    "the token is {} bytes; at least {MIN_TOKEN_LEN} are required \
                     (e.g. `openssl rand -hex 32`)",
                    token.len()
                )));
            }
            if token.len() > MAX_TOKEN_LEN {
                return Err(bad(format!(
                    "the token is {} bytes; at most {MAX_TOKEN_LEN} are allowed",
                    token.len()
                )));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(
                    "a token may only hold visible ASCII characters".to_owned()
                ));
            }
            let mut name = format!("line-{line}");
            let mut access = Access::ReadWrite;
            for word in words {
                match word.split_once('=') {
                    Some(("name", value)) if !value.is_empty() => value.clone_into(&mut name),
                    None if word == "readonly" || word == "worker" => {
                        if access != Access::ReadWrite {
                            return Err(bad("a token is readonly or worker, not both".to_owned()));
                        }
                        access = if word == "worker" {
                            Access::Worker
                        } else {
                            Access::ReadOnly
                        };
                    }
                    _ => {
                        return Err(bad(format!(
                            "unknown attribute {word:?}; expected name=NAME, readonly or worker"
                        )));
                    }
                }
            }
            let digest = digest(token.as_bytes());
            if !digests.insert(digest) {
                return Err(bad("the same token appears twice".to_owned()));
            }
            if !names.insert(name.clone()) {
                return Err(bad(format!("the name {name:?} is used twice")));
            }
            entries.push(Entry {
                digest,
                name,
                access,
            });
        }
        if entries.is_empty() {
            return Err(TokenFileError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            entries: RwLock::new(Arc::new(entries)),
        })
    }

    /// How many tokens the set holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    /// Whether the set holds no token (never true for a loaded set).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.snapshot().is_empty()
    }

    /// Replaces every token with those of `newer`, at once: each call is
    /// checked against either the old set or the new one, never a mix.
    pub fn replace_with(&self, newer: TokenSet) {
        let newer = newer.snapshot();
        *self.entries.write().unwrap_or_else(PoisonError::into_inner) = newer;
    }

    fn snapshot(&self) -> Arc<Vec<Entry>> {
        // A panic while holding the lock cannot leave a half-written set
        // (the write is one pointer store), so a poisoned lock is still good.
        Arc::clone(&self.entries.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The entry whose token is `presented`. Every entry is compared, in
    /// constant time, whatever matches: the time taken depends only on the
    /// number of tokens and the length of what was presented.
    fn find(&self, presented: &[u8]) -> Option<Entry> {
        let entries = self.snapshot();
        let presented = digest(presented);
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, entry) in entries.iter().enumerate() {
            let equal = entry.digest.ct_eq(&presented);
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            index = u32::conditional_select(&index, &i, equal);
            found |= equal;
        }
        bool::from(found).then(|| entries[index as usize].clone())
    }

    /// Checks the `authorization` header of a call that needs `needed`;
    /// answers the token's name.
    fn check(&self, headers: &http::HeaderMap, needed: Need) -> Result<String, Status> {
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(Status::unauthenticated(
                "a bearer token is required: send the header `authorization: Bearer <token>` \
                 (exactly once)",
            ));
        };
        let value = value.as_bytes();
        let scheme_len = b"bearer ".len();
        if value.len() <= scheme_len || !value[..scheme_len].eq_ignore_ascii_case(b"bearer ") {
            return Err(Status::unauthenticated(
                "the authorization header must use the Bearer scheme: \
                 `authorization: Bearer <token>`",
            ));
        }
        let Some(entry) = self.find(value[scheme_len..].trim_ascii()) else {
            return Err(Status::unauthenticated("the bearer token is not valid"));
        };
        let refusal = match (needed, entry.access) {
            (Need::Any, _)
            | (Need::Access(Access::ReadOnly), Access::ReadOnly | Access::ReadWrite)
            | (Need::Access(Access::ReadWrite), Access::ReadWrite)
            | (Need::Access(Access::Worker), Access::Worker) => None,
            (Need::Access(Access::ReadWrite), Access::ReadOnly) => {
                Some("is read-only; this method needs a read-write token")
            }
            (Need::Access(Access::ReadOnly | Access::ReadWrite), Access::Worker) => {
                Some("is a worker token; it may only attach remote workers")
            }
            (Need::Access(Access::Worker), Access::ReadOnly | Access::ReadWrite) => Some(
                "is a client token; attaching a worker needs a token with the worker capability",
            ),
        };
        match refusal {
            Some(why) => Err(Status::permission_denied(format!(
                "token {:?} {why}",
                entry.name
            ))),
            None => Ok(entry.name),
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Which calls of a wrapped service need a token, and which access.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Guard {
    /// `jobd.v1.JobService`: the method name decides ([`required_access`]).
    JobService,
    /// `jobd.v1.WorkerService`: a worker token.
    WorkerService,
    /// Any method with any valid token (reflection under `--auth-reflection`).
    AnyToken,
}

/// What a call needs of its token.
#[derive(Debug, Clone, Copy)]
enum Need {
    Access(Access),
    /// Any valid token.
    Any,
}

/// Wraps a gRPC service so that each call is authenticated against `tokens`
/// before it reaches the service; with no tokens every call passes.
#[derive(Debug, Clone)]
pub(crate) struct Authenticated<S> {
    inner: S,
    tokens: Option<Arc<TokenSet>>,
    guard: Guard,
}

impl<S> Authenticated<S> {
    pub(crate) fn new(inner: S, tokens: Option<Arc<TokenSet>>, guard: Guard) -> Self {
        Self {
            inner,
            tokens,
            guard,
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Authenticated<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(tokens) = &self.tokens else {
            return Box::pin(self.inner.call(request));
        };
        let path = request.uri().path();
        let method = path.rsplit('/').next().unwrap_or_default();
        let needed = match self.guard {
            Guard::JobService => Need::Access(required_access(method)),
            Guard::WorkerService => Need::Access(Access::Worker),
            Guard::AnyToken => Need::Any,
        };
        match tokens.check(request.headers(), needed) {
            Ok(name) => {
                tracing::trace!(token = %name, path, "call authenticated");
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                tracing::debug!(path, code = ?status.code(), reason = status.message(), "call refused");
                // The body is dropped unread, so a refused call costs no
                // decoding and reaches no handler.
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

impl<S: NamedService> NamedService for Authenticated<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITER: &str = "writer-token-0123456789";
    const READER: &str = "reader-token-0123456789";
    const WORKER: &str = "worker-token-0123456789";

    fn tokens() -> TokenSet {
        TokenSet::parse(
            "t",
            &format!(
                "# tokens\n\n{WRITER} name=ci\n  {READER}   readonly name=dash  \n{WORKER} worker name=w\n"
            ),
        )
        .unwrap()
    }

    fn headers(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn the_file_format() {
        let set = tokens();
        assert_eq!(set.len(), 3);
        assert_eq!(set.find(WORKER.as_bytes()).unwrap().access, Access::Worker);
        assert_eq!(set.find(WRITER.as_bytes()).unwrap().name, "ci");
        let reader = set.find(READER.as_bytes()).unwrap();
        assert_eq!(
            (reader.name.as_str(), reader.access),
            ("dash", Access::ReadOnly)
        );
        assert!(set.find(b"writer-token-012345678").is_none());
        assert!(set.find(b"").is_none());
    }

    #[test]
    fn bad_files_are_refused_with_their_line() {
        let cases = [
            ("short-token", "line 1: the token is 11 bytes"),
            (
                "a-valid-token-0001 admin",
                "line 1: unknown attribute \"admin\"",
            ),
            ("a-valid-token-0001 name=", "unknown attribute \"name=\""),
            (
                "# c\na-valid-token-0001\na-valid-token-0001",
                "line 3: the same token appears twice",
            ),
            (
                "a-valid-token-0001 name=x\na-valid-token-0002 name=x",
                "line 2: the name \"x\" is used twice",
            ),
            ("a-valid-token-0001-é", "visible ASCII"),
            ("# only a comment\n\n", "holds no token"),
            (
                "a-valid-token-0001 readonly worker",
                "readonly or worker, not both",
            ),
        ];
        for (text, expected) in cases {
            let error = TokenSet::parse("f", text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn debug_output_never_shows_a_token() {
        let shown = format!("{:?}", tokens());
        assert!(shown.contains("ci") && shown.contains("dash"), "{shown}");
        assert!(!shown.contains("token-0123"), "{shown}");
    }

    #[test]
    fn header_checks() {
        let set = tokens();
        let code =
            |h: &http::HeaderMap, needed| set.check(h, Need::Access(needed)).map_err(|s| s.code());
        use tonic::Code::{PermissionDenied, Unauthenticated};
        assert_eq!(
            code(&http::HeaderMap::new(), Access::ReadOnly),
            Err(Unauthenticated)
        );
        assert_eq!(
            code(&headers(&format!("Bearer {WRITER}")), Access::ReadWrite),
            Ok("ci".to_owned())
        );
        // The scheme is case-insensitive (RFC 7235).
        assert_eq!(
            code(&headers(&format!("bearer {READER}")), Access::ReadOnly),
            Ok("dash".to_owned())
        );
        assert_eq!(
            code(&headers(&format!("Bearer {READER}")), Access::ReadWrite),
            Err(PermissionDenied)
        );
        for value in [
            format!("Basic {WRITER}"),
            WRITER.to_owned(),
            "Bearer ".to_owned(),
            format!("Bearer {WRITER}x"),
        ] {
            assert_eq!(
                code(&headers(&value), Access::ReadOnly),
                Err(Unauthenticated),
                "{value}"
            );
        }
        let mut twice = headers(&format!("Bearer {WRITER}"));
        twice.append(
            http::header::AUTHORIZATION,
            format!("Bearer {WRITER}").parse().unwrap(),
        );
        assert_eq!(code(&twice, Access::ReadOnly), Err(Unauthenticated));
        // A worker token attaches workers and does nothing else; no client
        // token attaches a worker.
        let worker = headers(&format!("Bearer {WORKER}"));
        assert_eq!(code(&worker, Access::Worker), Ok("w".to_owned()));
        assert_eq!(code(&worker, Access::ReadOnly), Err(PermissionDenied));
        assert_eq!(code(&worker, Access::ReadWrite), Err(PermissionDenied));
        for client in [WRITER, READER] {
            let client = headers(&format!("Bearer {client}"));
            assert_eq!(code(&client, Access::Worker), Err(PermissionDenied));
        }
        assert_eq!(
            set.check(&worker, Need::Any).map_err(|s| s.code()),
            Ok("w".to_owned())
        );
    }

    #[test]
    fn a_replaced_set_takes_effect_at_once() {
        let set = tokens();
        set.replace_with(TokenSet::parse("t", "a-brand-new-token-000 name=new").unwrap());
        assert_eq!(set.len(), 1);
        assert!(set.find(WRITER.as_bytes()).is_none());
        assert_eq!(set.find(b"a-brand-new-token-000").unwrap().name, "new");
    }

    #[test]
    fn unknown_methods_need_write_access() {
        for method in [
            "Done",
            "Result",
            "GetJob",
            "ListJobs",
            "Wait",
            "ListFunctions",
            "Watch",
            "ListWorkers",
        ] {
            assert_eq!(required_access(method), Access::ReadOnly, "{method}");
        }
        for method in [
            "Submit",
            "SubmitBatch",
            "Cancel",
            "DeleteJob",
            "Map",
            "",
            "submit",
        ] {
            assert_eq!(required_access(method), Access::ReadWrite, "{method}");
        }
    }
}
