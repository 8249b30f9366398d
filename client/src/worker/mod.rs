//! [`Worker`]: serve job functions to jobd from a process of your own, on
//! any machine that can reach it. jobd stays the one place where jobs are
//! submitted, stored, waited on and watched; a worker runs the jobs jobd
//! hands it and reports how they ended.
//!
//! A worker exists for functions that cannot live in jobd's process: code
//! in another codebase, on a machine with a GPU, next to the data. It keeps
//! one `jobd.v1.WorkerService/Session` stream open (see `worker.proto`),
//! reconnects it whenever it breaks, and drains when told to stop.
//!
//! Module map, each using only those after it: `session` (the reconnect
//! loop and one session's rules), `protocol` (every pb conversion of the
//! worker protocol), `jobs` (running one job: async or blocking, cancel,
//! panic), `function` (what a served function is), `ctx` (what a function
//! sees: [`Ctx`] and [`JobFailure`]).

mod ctx;
mod function;
mod jobs;
mod protocol;
mod session;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    future::Future,
    time::Duration,
};

pub use self::ctx::{Ctx, JobFailure};
use tonic::transport::Channel;

use self::{
    function::{Body, Function, MAX_FUNCTIONS, MAX_SLOTS, is_valid_name},
    session::{Connection, Definition},
};
use crate::{connect::ConnectOptions, error::Error};

/// How long a worker waits for its connection to jobd before it counts the
/// attempt as failed and tries again later.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 pings on the worker's connection, so that a connection that died
/// without a word (a cut cable, a dropped NAT entry) is noticed in seconds
/// rather than after the operating system's TCP timeout, which can be many
/// minutes during which jobd has given the worker's jobs to others.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The grace a stopping worker gives its running jobs by default.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// The largest result a worker reports by default: jobd's own default cap
/// on results (`--max-result-bytes`).
const DEFAULT_MAX_RESULT_BYTES: usize = 1 << 20;

/// A worker process: the job functions it serves and how it attaches to
/// jobd. Build it, register functions, then [`run`](Self::run) it until a
/// shutdown signal.
///
/// Functions are written as for jobd's own registry: async ones get a
/// [`Ctx`] and the job's arguments and return a future; blocking ones run
/// on the runtime's blocking threads. Both return
/// `Result<serde_json::Value, JobFailure>`.
///
/// ```no_run
/// use jobd_client::{Ctx, JobFailure, Worker};
/// use serde_json::{Value, json};
///
/// # async fn serve() -> Result<(), jobd_client::Error> {
/// Worker::new("http://127.0.0.1:50051")
///     .name("image-worker")
///     .slots(4)
///     .label("gpu", "true")
///     .register_async("greet", "Greets {name}", |_ctx: Ctx, args: Value| async move {
///         Ok(json!(format!("hi {}", args["name"].as_str().unwrap_or("you"))))
///     })
///     .with_args_schema(json!({
///         "type": "object",
///         "properties": {"name": {"type": "string"}},
///         "required": ["name"]
///     }))
///     .returns("a greeting")
///     .register_blocking("square", "Squares a number", |_ctx: Ctx, args: Value| {
///         let n: f64 = serde_json::from_value(args)?;
///         Ok(json!(n * n))
///     })
///     .run(async {
///         let _ = tokio::signal::ctrl_c().await;
///     })
///     .await
/// # }
/// ```
///
/// Then, from any client: `client.submit("greet", json!({"name": "Ann"}))`.
///
/// What a running worker does:
///
/// - It takes at most [`slots`](Self::slots) jobs at once: jobd never
///   assigns more than the worker has said it can run.
/// - Every job's report is kept until jobd acknowledges it, and sent again
///   after a reconnect; the running jobs carry on across a reconnect.
/// - A cancel from jobd drops an async function's future at once (the
///   next `.await` is never reached) and raises the [`Ctx`] flag of a
///   blocking one, which should return [`JobFailure::Cancelled`].
/// - A function that panics fails its job as panicked; the worker carries
///   on (unless the binary is built with `panic = "abort"`).
/// - The connection is reconnected after every break (after 100 ms,
///   doubling up to 5 s, with jitter) until the worker is told to stop.
///   jobd refusing the worker (a bad schema, a token without the `worker`
///   capability, a function jobd defines otherwise) ends [`run`](Self::run)
///   with that error instead.
#[must_use = "a worker does nothing until it is run"]
pub struct Worker {
    target: Target,
    options: ConnectOptions,
    name: String,
    slots: u32,
    labels: HashMap<String, String>,
    version: String,
    grace: Duration,
    max_result_bytes: usize,
    functions: Vec<Function>,
    /// Mistakes made while building (a repeated name, a description with no
    /// function before it): `run` refuses to start and names them, so that
    /// building stays a chain of calls without a `Result` at each link.
    mistakes: Vec<String>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("target", &self.target)
            .field("options", &self.options)
            .field("name", &self.name)
            .field("slots", &self.slots)
            .field(
                "functions",
                &self.functions.iter().map(|f| &f.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Where a worker's sessions go.
#[derive(Debug)]
enum Target {
    /// A connection of its own to this address, opened for each session.
    Addr(String),
    /// The caller's channel, which reconnects by itself.
    Channel(Channel),
}

impl Worker {
    /// A worker for the jobd at `addr` (as for
    /// [`JobClient::connect`](crate::JobClient::connect): a URI, or a bare
    /// `host:port` for `http://`), with no functions yet and these
    /// defaults: named after the program, one slot per CPU, no labels, a
    /// 30 s grace, results up to 1 MiB.
    pub fn new(addr: impl Into<String>) -> Self {
        Self::with_target(Target::Addr(addr.into()))
    }

    /// A worker whose sessions go through `channel` (to share a connection,
    /// to reach jobd through a connector of your own such as a Unix socket,
    /// or to set timeouts yourself), with the defaults of
    /// [`new`](Self::new). The channel brings its own TLS settings, and
    /// reconnects by itself when its connection breaks; of
    /// [`connect_options`](Self::connect_options) only the bearer token is
    /// used. Set HTTP/2 keep-alive on it, so that a connection that dies
    /// without a word is noticed.
    ///
    /// ```no_run
    /// # async fn build() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    ///
    /// let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50051")
    ///     .http2_keep_alive_interval(Duration::from_secs(10))
    ///     .connect_lazy();
    /// let worker = jobd_client::Worker::from_channel(channel);
    /// # Ok(()) }
    /// ```
    pub fn from_channel(channel: Channel) -> Self {
        Self::with_target(Target::Channel(channel))
    }

    fn with_target(target: Target) -> Self {
        let slots = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(MAX_SLOTS))
            .min(MAX_SLOTS);
        Self {
            target,
            options: ConnectOptions::new(),
            name: program_name(),
            slots,
            labels: HashMap::new(),
            version: concat!("jobd-client ", env!("CARGO_PKG_VERSION")).to_owned(),
            grace: DEFAULT_GRACE,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            functions: Vec::new(),
            mistakes: Vec::new(),
        }
    }

    /// TLS settings and the bearer token, as for
    /// [`JobClient::connect_with`](crate::JobClient::connect_with). jobd
    /// lets a worker attach only with a token that has the `worker`
    /// capability (and such a token can do nothing else).
    ///
    /// ```no_run
    /// # fn build() -> Result<(), Box<dyn std::error::Error>> {
    /// use jobd_client::{ConnectOptions, Worker};
    ///
    /// let worker = Worker::new("https://jobd.example:50051").connect_options(
    ///     ConnectOptions::new()
    ///         .ca_certificate_pem(std::fs::read("ca.pem")?)
    ///         .bearer_token(std::env::var("JOBD_TOKEN")?),
    /// );
    /// # Ok(()) }
    /// ```
    pub fn connect_options(mut self, options: ConnectOptions) -> Self {
        self.options = options;
        self
    }

    /// What the worker calls itself in `jobctl workers` (1 to 128
    /// characters of `[A-Za-z0-9_.:-]`); by default the program's name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How many jobs it runs at once (1 to 10,000); by default one per CPU.
    /// Blocking functions take one of the runtime's blocking threads each,
    /// so at most this many of them run at once.
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Adds a label: a job submitted with worker labels
    /// ([`Submission::worker_label`](crate::Submission::worker_label)) goes
    /// only to workers that carry all of them.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The software and version `jobctl workers` shows; by default this
    /// library's.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// How long running jobs get to finish once the worker is told to stop
    /// (30 s by default); what still runs then is given back to jobd, which
    /// runs it again elsewhere.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The largest value (as JSON text) a job may return; a larger one
    /// fails the job instead of being sent. 1 MiB by default, jobd's own
    /// default cap (`jobd --max-result-bytes`); raise both together.
    pub fn max_result_bytes(mut self, bytes: usize) -> Self {
        self.max_result_bytes = bytes;
        self
    }

    /// Serves an async function, run as a task on the runtime that runs the
    /// worker. A cancel drops its future.
    ///
    /// A name must be 1 to 128 characters of `[A-Za-z0-9_.:-]`, used once,
    /// and not one of jobd's own functions (jobd refuses the attach); `run`
    /// refuses a worker that breaks the first two rules.
    pub fn register_async<F, Fut>(self, name: &str, description: &str, f: F) -> Self
    where
        F: Fn(Ctx, serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, JobFailure>> + Send + 'static,
    {
        self.register(name, description, Body::from_async(f))
    }

    /// Serves a blocking function, run on the runtime's blocking threads
    /// (`tokio::task::spawn_blocking`). It cannot be interrupted: it should
    /// check its [`Ctx`] to honour a cancel. Names as for
    /// [`register_async`](Self::register_async).
    pub fn register_blocking<F>(self, name: &str, description: &str, f: F) -> Self
    where
        F: Fn(Ctx, serde_json::Value) -> Result<serde_json::Value, JobFailure>
            + Send
            + Sync
            + 'static,
    {
        self.register(name, description, Body::from_blocking(f))
    }

    fn register(mut self, name: &str, description: &str, body: Body) -> Self {
        self.functions.push(Function {
            name: name.to_owned(),
            description: description.to_owned(),
            args_schema: None,
            returns: None,
            not_safe_to_retry: false,
            body,
        });
        self
    }

    /// Declares the JSON Schema the arguments of the function registered
    /// last must match. jobd checks every submission against it and
    /// refuses a mismatch before the job is accepted; `jobctl functions`
    /// shows it. jobd compiles it when the worker attaches, and refuses the
    /// worker if it is not a valid schema.
    ///
    /// ```
    /// use jobd_client::Worker;
    /// use serde_json::json;
    ///
    /// let worker = Worker::new("127.0.0.1:50051")
    ///     .register_blocking("add", "Adds two numbers", |_ctx, args| {
    ///         let (a, b): (f64, f64) = serde_json::from_value(args)?;
    ///         Ok(json!(a + b))
    ///     })
    ///     .with_args_schema(json!({
    ///         "type": "array",
    ///         "items": {"type": "number"},
    ///         "minItems": 2,
    ///         "maxItems": 2
    ///     }))
    ///     .returns("the sum, a number");
    /// ```
    pub fn with_args_schema(self, schema: serde_json::Value) -> Self {
        self.describe_last("with_args_schema", |f| f.args_schema = Some(schema))
    }

    /// Says what the function registered last returns, in words (shown by
    /// `jobctl functions`).
    pub fn returns(self, text: impl Into<String>) -> Self {
        let text = text.into();
        self.describe_last("returns", |f| f.returns = Some(text))
    }

    /// Declares that a run of the function registered last must not be
    /// repeated when its worker is lost mid-run (it charges a card, sends
    /// a mail): jobd then fails the job with `worker_lost` instead of
    /// running it again.
    pub fn not_safe_to_retry(self) -> Self {
        self.describe_last("not_safe_to_retry", |f| f.not_safe_to_retry = true)
    }

    fn describe_last(mut self, what: &str, describe: impl FnOnce(&mut Function)) -> Self {
        match self.functions.last_mut() {
            Some(function) => describe(function),
            None => self
                .mistakes
                .push(format!("{what} needs a function registered before it")),
        }
        self
    }

    /// Runs the worker: attaches to jobd (and keeps reattaching whenever the
    /// connection breaks), runs the jobs jobd assigns, and returns once
    /// `shutdown` has resolved and the worker has drained: it tells jobd it
    /// takes nothing new, lets the running jobs finish within the
    /// [`grace`](Self::grace), gives back what still runs then, and waits
    /// (within the grace) until jobd has acknowledged every report.
    ///
    /// Must be called inside a tokio runtime. When it returns, every job it
    /// started has ended or been cancelled; a blocking function that does
    /// not look at its [`Ctx`] keeps its thread until it returns.
    ///
    /// ```no_run
    /// # async fn serve(worker: jobd_client::Worker) -> Result<(), jobd_client::Error> {
    /// // SIGINT or SIGTERM, whichever comes first, drains the worker.
    /// use tokio::signal::unix::{SignalKind, signal};
    /// let mut terminate = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    /// worker
    ///     .run(async move {
    ///         tokio::select! {
    ///             _ = tokio::signal::ctrl_c() => {}
    ///             _ = terminate.recv() => {}
    ///         }
    ///     })
    ///     .await
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Before connecting: [`Error::InvalidWorker`] (no function, a bad or
    /// repeated name, slots out of range), [`Error::InvalidAddress`] or
    /// [`Error::InvalidOptions`]. Later, when jobd refuses the worker:
    /// [`Error::InvalidArgument`] (e.g. a schema jobd cannot compile) or
    /// [`Error::Rpc`] (`PERMISSION_DENIED` for a token without the `worker`
    /// capability, `FAILED_PRECONDITION` for a function jobd already has
    /// with another definition, `UNIMPLEMENTED` for a jobd without workers).
    /// A connection that breaks, or a jobd that is away, is never an error:
    /// the worker waits for it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let connection = match &self.target {
            Target::Addr(addr) => Connection::Endpoint(Box::new(
                self.options
                    .endpoint(addr)?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true),
            )),
            Target::Channel(channel) => Connection::Channel(channel.clone()),
        };
        let credentials = self.options.credentials()?;
        let definition = self.definition()?;
        session::run(definition, connection, credentials, shutdown).await
    }

    /// The checked definition, or every mistake in it.
    fn definition(self) -> Result<Definition, Error> {
        let mut mistakes = self.mistakes;
        if !is_valid_name(&self.name) {
            mistakes.push(format!(
                "the worker's name {:?} is not 1-128 characters of [A-Za-z0-9_.:-]",
                self.name
            ));
        }
        if !(1..=MAX_SLOTS).contains(&self.slots) {
            mistakes.push(format!(
                "{} slots: a worker has 1 to {MAX_SLOTS}",
                self.slots
            ));
        }
        if self.functions.is_empty() {
            mistakes.push("it serves no function: register one".to_owned());
        }
        if self.functions.len() > MAX_FUNCTIONS {
            mistakes.push(format!(
                "{} functions: a worker serves at most {MAX_FUNCTIONS}",
                self.functions.len()
            ));
        }
        let mut functions = BTreeMap::new();
        for function in self.functions {
            if !is_valid_name(&function.name) {
                mistakes.push(format!(
                    "the function name {:?} is not 1-128 characters of [A-Za-z0-9_.:-]",
                    function.name
                ));
            } else if functions.contains_key(&function.name) {
                mistakes.push(format!(
                    "the function {:?} is registered twice",
                    function.name
                ));
            } else {
                functions.insert(function.name.clone(), function);
            }
        }
        if !mistakes.is_empty() {
            return Err(Error::InvalidWorker(mistakes.join("; ")));
        }
        Ok(Definition {
            name: self.name,
            slots: self.slots,
            labels: self.labels,
            version: self.version,
            grace: self.grace,
            max_result_bytes: self.max_result_bytes,
            functions,
        })
    }
}

/// The running program's file name, when it is a usable worker name.
fn program_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|path| Some(path.file_stem()?.to_str()?.to_owned()))
        .filter(|name| is_valid_name(name))
        .unwrap_or_else(|| "worker".to_owned())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn echo(worker: Worker, name: &str) -> Worker {
        worker.register_async(name, "", |_ctx, args| async move { Ok(args) })
    }

    #[test]
    fn every_mistake_in_a_definition_is_named_at_once() {
        let worker = Worker::new("127.0.0.1:1")
            .returns("nothing yet")
            .name("bad name")
            .slots(0);
        let worker = echo(echo(echo(worker, "twice"), "twice"), "no/slash");
        let Err(Error::InvalidWorker(message)) = worker.definition() else {
            panic!("accepted");
        };
        for part in [
            "returns needs a function registered before it",
            "\"bad name\"",
            "0 slots",
            "\"twice\" is registered twice",
            "\"no/slash\"",
        ] {
            assert!(message.contains(part), "{part:?} not in {message:?}");
        }
        assert!(matches!(
            Worker::new("127.0.0.1:1").definition(),
            Err(Error::InvalidWorker(m)) if m.contains("no function")
        ));
    }

    #[test]
    fn descriptions_go_to_the_function_registered_last() {
        let worker = echo(echo(Worker::new("127.0.0.1:1").name("w"), "a"), "b")
            .with_args_schema(json!({"type": "string"}))
            .returns("its argument")
            .not_safe_to_retry();
        let definition = worker.definition().unwrap();
        let (a, b) = (&definition.functions["a"], &definition.functions["b"]);
        assert_eq!(a.args_schema, None);
        assert!(!a.not_safe_to_retry);
        assert_eq!(b.args_schema, Some(json!({"type": "string"})));
        assert_eq!(b.returns.as_deref(), Some("its argument"));
        assert!(b.not_safe_to_retry);
        assert!((1..=MAX_SLOTS).contains(&definition.slots));
    }

    #[tokio::test]
    async fn a_bad_definition_fails_before_connecting() {
        // Nothing listens on port 1: a connection attempt would hang in
        // the reconnect loop rather than fail.
        let refused = Worker::new("127.0.0.1:1").run(std::future::pending()).await;
        assert!(
            matches!(refused, Err(Error::InvalidWorker(_))),
            "{refused:?}"
        );
    }
}
