//! The function registry: which named job functions this server can run, and
//! on which pool.
//!
//! Embedders build a [`Registry`], register their own async, blocking or
//! process functions next to (or instead of) the
//! [built-ins](crate::builtins), and hand it to the
//! [`Engine`](crate::Engine). Async and blocking functions may also be sent
//! to the process pool by a Submit that asks for it ([`Function::runs_on`]);
//! the program must then serve as its own child (see [`crate::process`]).
//!
//! A function may also declare the JSON Schema its argument must match and a
//! description of its result ([`Registry::with_args_schema`],
//! [`Registry::returns`]): `ListFunctions` shows both, so a client can learn
//! how to call a function without reading its code, and Submit checks the
//! argument against the schema before it accepts the job. Schemas are
//! compiled once, here, at registration.

use std::{
    collections::BTreeMap, fmt, future::Future, panic::AssertUnwindSafe, pin::Pin, sync::Arc,
};

use crate::{
    ctx::Ctx,
    job::{JobError, Outcome},
};

/// The kind of executor a function runs on: how its code is run and how a
/// cancel reaches it. A pool (see [`PoolName`](crate::PoolName)) is an
/// executor of one kind; new kinds may be added, so match with a wildcard
/// arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PoolKind {
    /// Tokio tasks with a concurrency limit: for I/O-bound work.
    Async,
    /// A fixed set of dedicated OS threads: for CPU-bound or blocking work.
    Blocking,
    /// Remote worker processes attached over the worker protocol: for the
    /// functions they declare.
    Worker,
    /// Child processes of jobd, one job at a time each: for functions that
    /// must not be able to harm the server (a crash, a leak, a runaway
    /// loop) and that must be stopped for sure (cancel and time limits kill
    /// the child's whole process group). See [`crate::process`].
    Process,
}

impl PoolKind {
    /// The pool's name on the wire and in the CLI.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Async => "async",
            Self::Blocking => "blocking",
            Self::Worker => "worker",
            Self::Process => "process",
        }
    }

    /// Parses a pool name as clients send it.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "async" => Some(Self::Async),
            "blocking" => Some(Self::Blocking),
            "worker" => Some(Self::Worker),
            "process" => Some(Self::Process),
            _ => None,
        }
    }
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A boxed future as async job functions return it.
pub type JobFuture = Pin<Box<dyn Future<Output = Outcome> + Send + 'static>>;

type AsyncBody = Arc<dyn Fn(Ctx, serde_json::Value) -> JobFuture + Send + Sync>;
type BlockingBody = Arc<dyn Fn(Ctx, serde_json::Value) -> Outcome + Send + Sync>;

/// The code of a registered function.
#[derive(Clone)]
pub(crate) enum Body {
    Async(AsyncBody),
    Blocking(BlockingBody),
    /// Declared by remote workers, which hold its code.
    Worker,
    /// Run in a child process of the process pool, which finds it by name
    /// in its own registry; never called in the server itself.
    Process(BlockingBody),
}

/// One registered job function.
#[derive(Clone)]
pub struct Function {
    name: Arc<str>,
    description: String,
    body: Body,
    /// False for functions whose interrupted runs must not be repeated.
    retry_safe: bool,
    /// The schema its argument must match, if it declared one.
    args_schema: Option<ArgsSchema>,
    /// What it returns, in words, if it said.
    returns: Option<String>,
    /// False for a function the children of the process pool do not have
    /// (one registered from the server's configuration, which they never
    /// read): it runs in the server only.
    in_children: bool,
}

/// A function's argument schema: the JSON Schema as written, and the
/// validator compiled from it once at registration.
#[derive(Clone)]
struct ArgsSchema {
    source: serde_json::Value,
    validator: Arc<jsonschema::Validator>,
}

/// A registered function's schema is not a valid JSON Schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid argument schema for job function {function:?}: {reason}")]
pub struct InvalidSchema {
    /// The function the schema was given for.
    pub function: String,
    /// What the JSON Schema meta-schema (or the compiler) said.
    pub reason: String,
}

/// One way an argument breaks its function's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgsViolation {
    /// Where in the request: `args` itself, or a path below it such as
    /// `args.name` or `args[0]`.
    pub field: String,
    /// What is wrong there, as the schema validator says it.
    pub description: String,
}

impl Function {
    /// The name clients submit it by.
    #[must_use]
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The one-line description `ListFunctions` shows.
    #[must_use]
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The pool it runs on.
    #[must_use]
    pub fn pool(&self) -> PoolKind {
        match self.body {
            Body::Async(_) => PoolKind::Async,
            Body::Blocking(_) => PoolKind::Blocking,
            Body::Worker => PoolKind::Worker,
            Body::Process(_) => PoolKind::Process,
        }
    }

    /// Whether a Submit may ask for `pool` for this function: its own pool,
    /// or the process pool for a function whose code this server holds (an
    /// async or blocking one), as a caller of Python's concurrent.futures
    /// picks a thread or a process pool for the same function. Functions
    /// registered for the process pool never run in the server itself,
    /// functions of remote workers run only on their workers, and command
    /// functions (from the server's configuration) only in the server.
    #[must_use]
    pub fn runs_on(&self, pool: PoolKind) -> bool {
        pool == self.pool()
            || (pool == PoolKind::Process
                && self.in_children
                && matches!(self.body, Body::Async(_) | Body::Blocking(_)))
    }

    /// A function declared by a remote worker: its name, description,
    /// optional argument schema (compiled here), what it returns, and
    /// whether a run lost with its worker may be repeated.
    pub(crate) fn declared(
        name: &str,
        description: &str,
        args_schema: Option<serde_json::Value>,
        returns: Option<String>,
        retry_safe: bool,
    ) -> Result<Self, InvalidSchema> {
        let args_schema = args_schema
            .map(|schema| {
                jsonschema::validator_for(&schema)
                    .map(|validator| ArgsSchema {
                        source: schema,
                        validator: Arc::new(validator),
                    })
                    .map_err(|err| InvalidSchema {
                        function: name.to_owned(),
                        reason: err.to_string(),
                    })
            })
            .transpose()?;
        Ok(Self {
            name: Arc::from(name),
            description: description.to_owned(),
            body: Body::Worker,
            retry_safe,
            args_schema,
            returns,
            in_children: false,
        })
    }

    /// True when `other` takes the same arguments under the same rules: the
    /// same schema and retry safety (descriptions may differ).
    pub(crate) fn same_contract(&self, other: &Self) -> bool {
        self.retry_safe == other.retry_safe
            && self.args_schema.as_ref().map(|s| &s.source)
                == other.args_schema.as_ref().map(|s| &s.source)
    }

    /// Whether a run interrupted by a crash may be run again (the default);
    /// see [`Registry::not_safe_to_retry`].
    #[must_use]
    pub fn retry_safe(&self) -> bool {
        self.retry_safe
    }

    /// The JSON Schema its argument must match, if it declared one.
    #[must_use]
    pub fn args_schema(&self) -> Option<&serde_json::Value> {
        self.args_schema.as_ref().map(|schema| &schema.source)
    }

    /// What it returns, in words, if it said (see [`Registry::returns`]).
    #[must_use]
    pub fn returns(&self) -> Option<&str> {
        self.returns.as_deref()
    }

    /// Checks `args` against the function's schema: every violation, each
    /// with the path of the offending part (`args.name`, `args[2]`); empty
    /// when the argument fits or the function declared no schema.
    ///
    /// ```
    /// use serde_json::json;
    ///
    /// let registry = jobd::builtins::registry();
    /// let hello = registry.get("hello").unwrap();
    /// assert!(hello.check_args(&json!({"name": "Ann"})).is_empty());
    /// let violations = hello.check_args(&json!({"name": 5}));
    /// assert_eq!(violations[0].field, "args.name");
    /// ```
    #[must_use]
    pub fn check_args(&self, args: &serde_json::Value) -> Vec<ArgsViolation> {
        let Some(schema) = &self.args_schema else {
            return Vec::new();
        };
        // The common case, without building an error iterator per Submit.
        if schema.validator.is_valid(args) {
            return Vec::new();
        }
        schema
            .validator
            .iter_errors(args)
            .map(|error| ArgsViolation {
                field: field_path(error.instance_path()),
                description: error.to_string(),
            })
            .collect()
    }

    pub(crate) fn body(&self) -> &Body {
        &self.body
    }
}

/// A JSON pointer into `args` as a request field path: `args`, then `.key`
/// for object members (`["key"]` when the key is not a plain identifier)
/// and `[n]` for array elements, as AIP-193 field violations name fields.
fn field_path(pointer: &jsonschema::paths::Location) -> String {
    use jsonschema::paths::LocationSegment;
    let mut path = String::from("args");
    for segment in pointer.segments() {
        match segment {
            LocationSegment::Index(i) => path.push_str(&format!("[{i}]")),
            LocationSegment::Property(key) => {
                let plain = key
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if plain {
                    path.push('.');
                    path.push_str(&key);
                } else {
                    path.push_str(&format!("[{key:?}]"));
                }
            }
        }
    }
    path
}

/// Runs user code that may panic; a panic fails the job, not the executor.
pub(crate) fn guarded<T>(run: impl FnOnce() -> T) -> Result<T, JobError> {
    std::panic::catch_unwind(AssertUnwindSafe(run)).map_err(|panic| panicked(&*panic))
}

/// The message of a caught panic, which is a `&str` or a `String` unless the
/// code panicked with some other payload.
pub(crate) fn panicked(payload: &(dyn std::any::Any + Send)) -> JobError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned());
    JobError::Panicked(message)
}

impl fmt::Debug for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Function")
            .field("name", &self.name)
            .field("pool", &self.pool())
            .finish_non_exhaustive()
    }
}

/// The longest function name accepted at registration and at Submit.
pub const MAX_FUNCTION_NAME_LEN: usize = 128;

/// True if `name` is a usable function name: 1 to 128 characters of ASCII
/// letters, digits, `_`, `-`, `.` and `:`. Shared by registration and request
/// validation so the two cannot drift apart.
#[must_use]
pub fn is_valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_FUNCTION_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// The named job functions a server can run.
///
/// ```
/// use jobd::{Ctx, JobError, Registry};
/// use serde_json::{json, Value};
///
/// let mut registry = Registry::new();
/// registry
///     .register_async("greet", "Greets {name}", |_ctx: Ctx, args: Value| async move {
///         Ok(json!(format!("hi {}", args["name"].as_str().unwrap_or("you"))))
///     })
///     .register_blocking("square", "Squares a number", |_ctx: Ctx, args: Value| {
///         let n = args.as_f64().ok_or_else(|| JobError::bad_args("expected a number"))?;
///         Ok(json!(n * n))
///     });
/// assert_eq!(registry.len(), 2);
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    functions: BTreeMap<Arc<str>, Function>,
    /// What `with_args_schema` and `returns` apply to.
    last: Option<Arc<str>>,
}

impl Registry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an async function, run as a tokio task on the async pool.
    /// Cancelling it while it runs drops (aborts) its future.
    ///
    /// # Panics
    ///
    /// If `name` is not a valid function name (see [`is_valid_function_name`])
    /// or is already registered: both are programming errors caught at start-up.
    pub fn register_async<F, Fut>(&mut self, name: &str, description: &str, f: F) -> &mut Self
    where
        F: Fn(Ctx, serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let body: AsyncBody = Arc::new(move |ctx, args| Box::pin(f(ctx, args)));
        self.insert(name, description, Body::Async(body))
    }

    /// Registers a blocking function, run on one of the blocking pool's
    /// dedicated threads. It cannot be interrupted: it should check its
    /// [`Ctx`] to honour cancel requests.
    ///
    /// # Panics
    ///
    /// As [`Registry::register_async`].
    pub fn register_blocking<F>(&mut self, name: &str, description: &str, f: F) -> &mut Self
    where
        F: Fn(Ctx, serde_json::Value) -> Outcome + Send + Sync + 'static,
    {
        self.insert(name, description, Body::Blocking(Arc::new(f)))
    }

    /// Registers a function that runs only in child processes of the
    /// process pool, one job at a time per child: a crash, an abort, a leak
    /// or a runaway loop there costs one child (the job fails with
    /// `WORKER_LOST`, or times out), never the server. Cancel and time
    /// limits kill the child's whole process group.
    ///
    /// The child finds the function by name in its own registry: the
    /// program the children run must call
    /// [`run_child_if_requested`](crate::process::run_child_if_requested)
    /// with a registry that holds it (see [`crate::process`]). `f` is never
    /// called in the server itself.
    ///
    /// ```
    /// use jobd::{JobError, Registry};
    /// use serde_json::json;
    ///
    /// let mut registry = Registry::new();
    /// registry.register_process("parse", "Parses untrusted input in a child", |_ctx, args| {
    ///     let text = args.as_str().ok_or_else(|| JobError::bad_args("expected a string"))?;
    ///     Ok(json!(text.len()))
    /// });
    /// assert_eq!(registry.get("parse").unwrap().pool(), jobd::PoolKind::Process);
    /// ```
    ///
    /// # Panics
    ///
    /// As [`Registry::register_async`].
    pub fn register_process<F>(&mut self, name: &str, description: &str, f: F) -> &mut Self
    where
        F: Fn(Ctx, serde_json::Value) -> Outcome + Send + Sync + 'static,
    {
        self.insert(name, description, Body::Process(Arc::new(f)))
    }

    fn insert(&mut self, name: &str, description: &str, body: Body) -> &mut Self {
        assert!(
            is_valid_function_name(name),
            "invalid job function name {name:?}: use 1-{MAX_FUNCTION_NAME_LEN} characters of [A-Za-z0-9_.:-]"
        );
        let name: Arc<str> = Arc::from(name);
        let function = Function {
            name: Arc::clone(&name),
            description: description.to_owned(),
            body,
            retry_safe: true,
            args_schema: None,
            returns: None,
            in_children: true,
        };
        let previous = self.functions.insert(Arc::clone(&name), function);
        assert!(
            previous.is_none(),
            "job function {name:?} is registered twice"
        );
        self.last = Some(name);
        self
    }

    /// The function registered last, which the builder-style methods below
    /// describe.
    fn last_mut(&mut self, what: &str) -> &mut Function {
        let name = self
            .last
            .clone()
            .unwrap_or_else(|| panic!("{what} needs a function registered before it"));
        self.functions
            .get_mut(&name)
            .expect("the last registered function is registered")
    }

    /// Declares the JSON Schema the argument of the function registered
    /// last must match. Submit then refuses a non-matching argument with
    /// `INVALID_ARGUMENT`, one field violation per problem, before the job
    /// is accepted; `ListFunctions` shows the schema. Any draft the
    /// `jsonschema` crate knows (2020-12 by default, or as `$schema` says);
    /// remote `$ref`s are not fetched.
    ///
    /// ```
    /// use jobd::Registry;
    /// use serde_json::json;
    ///
    /// let mut registry = Registry::new();
    /// registry
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
    /// let add = registry.get("add").unwrap();
    /// assert!(add.check_args(&json!([1, 2])).is_empty());
    /// assert_eq!(add.check_args(&json!([1, "two"]))[0].field, "args[1]");
    /// ```
    ///
    /// # Panics
    ///
    /// If no function was registered yet, or `schema` is not a valid JSON
    /// Schema (a programming error caught at start-up, like a duplicate
    /// name); [`Registry::try_with_args_schema`] returns the error instead.
    pub fn with_args_schema(&mut self, schema: serde_json::Value) -> &mut Self {
        match self.try_with_args_schema(schema) {
            Ok(registry) => registry,
            Err(err) => panic!("{err}"),
        }
    }

    /// As [`Registry::with_args_schema`], returning an invalid schema as an
    /// error instead of panicking.
    ///
    /// ```
    /// let mut registry = jobd::Registry::new();
    /// registry.register_async("f", "", |_ctx, args| async move { Ok(args) });
    /// let err = registry
    ///     .try_with_args_schema(serde_json::json!({"type": "no-such-type"}))
    ///     .unwrap_err();
    /// assert_eq!(err.function, "f");
    /// ```
    ///
    /// # Errors
    ///
    /// [`InvalidSchema`] when `schema` does not compile.
    ///
    /// # Panics
    ///
    /// If no function was registered yet.
    pub fn try_with_args_schema(
        &mut self,
        schema: serde_json::Value,
    ) -> Result<&mut Self, InvalidSchema> {
        let function = self.last_mut("with_args_schema");
        let validator = jsonschema::validator_for(&schema).map_err(|err| InvalidSchema {
            function: function.name.to_string(),
            reason: err.to_string(),
        })?;
        function.args_schema = Some(ArgsSchema {
            source: schema,
            validator: Arc::new(validator),
        });
        Ok(self)
    }

    /// Describes, in words, what the function registered last returns;
    /// `ListFunctions` shows it.
    ///
    /// # Panics
    ///
    /// If no function was registered yet.
    pub fn returns(&mut self, description: &str) -> &mut Self {
        self.last_mut("returns").returns = Some(description.to_owned());
        self
    }

    /// Marks `name` as not safe to run twice: when the server dies while it
    /// runs, recovery marks the job FAILED ("interrupted by restart") instead
    /// of running it again. Execution is otherwise at-least-once.
    ///
    /// ```
    /// let mut registry = jobd::Registry::new();
    /// registry
    ///     .register_blocking("charge_card", "Charges a card once", |_ctx, args| Ok(args))
    ///     .not_safe_to_retry("charge_card");
    /// assert!(!registry.get("charge_card").unwrap().retry_safe());
    /// ```
    ///
    /// # Panics
    ///
    /// If `name` is not registered.
    pub fn not_safe_to_retry(&mut self, name: &str) -> &mut Self {
        self.functions
            .get_mut(name)
            .unwrap_or_else(|| panic!("job function {name:?} is not registered"))
            .retry_safe = false;
        self
    }

    /// Keeps the function registered last out of the process pool: the
    /// pool's children build their registry without it.
    pub(crate) fn server_only(&mut self) -> &mut Self {
        self.last_mut("server_only").in_children = false;
        self
    }

    /// Looks a function up by name.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Function> {
        self.functions.get(name)
    }

    /// All functions, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Function> {
        self.functions.values()
    }

    /// How many functions are registered.
    #[must_use]
    pub fn len(&self) -> usize {
        self.functions.len()
    }

    /// True when nothing is registered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.functions.values()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_are_validated_in_one_place() {
        assert!(is_valid_function_name("hello"));
        assert!(is_valid_function_name("ns:img.resize-v2_x"));
        assert!(!is_valid_function_name(""));
        assert!(!is_valid_function_name("has space"));
        assert!(!is_valid_function_name("nul\0"));
        assert!(!is_valid_function_name("émoji😀"));
        assert!(!is_valid_function_name(
            &"a".repeat(MAX_FUNCTION_NAME_LEN + 1)
        ));
    }

    #[test]
    #[should_panic(expected = "invalid argument schema for job function \"x\"")]
    fn an_invalid_schema_is_refused_at_registration() {
        Registry::new()
            .register_blocking("x", "", |_, v| Ok(v))
            .with_args_schema(serde_json::json!({"minimum": "not a number"}));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn duplicate_registration_is_refused() {
        let mut r = Registry::new();
        r.register_blocking("x", "", |_, v| Ok(v));
        r.register_blocking("x", "", |_, v| Ok(v));
    }
}
