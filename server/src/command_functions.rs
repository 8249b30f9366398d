//! Command functions: named jobs that run a program, declared by the
//! operator in a TOML file (`jobd --functions FILE`), so that users bring
//! their own code in any language without writing Rust.
//!
//! Commands come only from that file, never from a request. A job's
//! arguments reach the program as argv elements filled from a template
//! (each placeholder is exactly one element, whatever its value holds, and
//! a value may not start with `-` unless the function allows it), or as
//! JSON on stdin; never through a shell. The program starts with a clean
//! environment (PATH, plus what the file sets), in its own process group,
//! under the limits the file sets; a cancel or a time limit stops the whole
//! group. What it prints goes to the job's log; its stdout is the result.
//! How a program runs is `jobd-command`'s business, shared with `jobctl
//! worker --exec`: this module only reads the file and maps a run onto a
//! job.
//!
//! Command functions run on the blocking pool: each job holds one of its
//! threads while its program runs, so `--blocking-workers` bounds how many
//! programs run at once.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use jobd_command::{CommandSpec, Ending, Limits, OutputLine, ResultMode, Stream, Template};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    Ctx, JobError, Registry,
    function::is_valid_function_name,
    job::LogStream,
    units::{parse_bytes, parse_duration},
};

/// Why a functions file was refused. Every message names the file and,
/// where there is one, the function.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FunctionsFileError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or not the expected shape.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the parser said (with the line).
        message: String,
    },
    /// One function's definition is wrong.
    #[error("{path}: function {function:?}: {message}")]
    Function {
        /// The file.
        path: PathBuf,
        /// The function.
        function: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The file: `[functions.NAME]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    functions: BTreeMap<String, Entry>,
}

/// One `[functions.NAME]` table, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    description: Option<String>,
    command: CommandWords,
    args_schema: Option<toml::Value>,
    /// "json" (the arguments as one line of JSON) or "none".
    stdin: Option<String>,
    timeout: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    /// "json", "text" or "none".
    result: Option<String>,
    max_output: Option<String>,
    #[serde(default)]
    not_safe_to_retry: bool,
    #[serde(default)]
    allow_leading_dash: bool,
    limits: Option<LimitsEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CommandWords {
    Argv(Vec<String>),
    Line(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsEntry {
    memory: Option<String>,
    cpu_time: Option<String>,
    open_files: Option<u64>,
}

/// A command function, checked and ready to register.
#[derive(Debug, Clone)]
pub struct CommandFunction {
    name: String,
    description: String,
    template: Template,
    args_schema: Value,
    stdin_json: bool,
    timeout: Option<Duration>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
    result: ResultMode,
    max_output: Option<usize>,
    retry_safe: bool,
    limits: Limits,
}

impl CommandFunction {
    /// The function's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where its program would be found if a job ran now (in `PATH`, its
    /// working directory and its environment), for a check at start: jobs
    /// look it up again each time, so a program installed later is found.
    ///
    /// ```
    /// use std::path::Path;
    ///
    /// let functions = jobd::command_functions::parse(
    ///     "[functions.count]\ncommand = [\"wc\", \"-c\"]\n\n[functions.gone]\ncommand = [\"no-such-program-jobd\"]\n",
    ///     Path::new("functions.toml"),
    /// )?;
    /// assert!(functions[0].find_program().is_ok());
    /// assert_eq!(
    ///     functions[1].find_program().unwrap_err().to_string(),
    ///     "not found in PATH"
    /// );
    /// # Ok::<(), jobd::command_functions::FunctionsFileError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Why the program could not be started now.
    pub fn find_program(&self) -> Result<PathBuf, jobd_command::SpawnError> {
        self.environment(CommandSpec::new(self.template.program()))
            .find_program()
    }

    /// `spec` in the environment this function's program runs in: `PATH`
    /// inherited, its own variables, its working directory. The lookup of
    /// [`find_program`](Self::find_program) and each job's run share it.
    fn environment(&self, mut spec: CommandSpec) -> CommandSpec {
        spec = spec.inherit_path(true);
        for (name, value) in &self.env {
            spec = spec.env(name, value);
        }
        if let Some(dir) = &self.cwd {
            spec = spec.current_dir(dir);
        }
        spec
    }

    /// Whether it runs its program under resource limits (which need the
    /// limits helper, see [`register`]).
    #[must_use]
    pub fn has_limits(&self) -> bool {
        !self.limits.is_empty()
    }
}

/// Reads and checks a functions file.
///
/// # Errors
///
/// A [`FunctionsFileError`] naming the file, the function and the mistake.
pub fn load(path: &Path) -> Result<Vec<CommandFunction>, FunctionsFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FunctionsFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Checks the text of a functions file (`path` only names it in errors).
///
/// ```
/// let functions = jobd::command_functions::parse(
///     r#"
///     [functions.upper]
///     description = "Shouts"
///     command = ["tr", "a-z", "A-Z"]
///     result = "text"
///     "#,
///     "functions.toml".as_ref(),
/// ).unwrap();
/// assert_eq!(functions[0].name(), "upper");
/// ```
///
/// # Errors
///
/// A [`FunctionsFileError`] naming the function and the mistake.
pub fn parse(text: &str, path: &Path) -> Result<Vec<CommandFunction>, FunctionsFileError> {
    let file: File = toml::from_str(text).map_err(|err| FunctionsFileError::Syntax {
        path: path.to_owned(),
        message: err.to_string().trim().replace('\n', " "),
    })?;
    file.functions
        .into_iter()
        .map(|(name, entry)| {
            check(&name, entry).map_err(|message| FunctionsFileError::Function {
                path: path.to_owned(),
                function: name,
                message,
            })
        })
        .collect()
}

fn check(name: &str, entry: Entry) -> Result<CommandFunction, String> {
    if !is_valid_function_name(name) {
        return Err("not a valid function name (1-128 characters of [A-Za-z0-9_.:-])".into());
    }
    let schema = entry
        .args_schema
        .map(|schema| serde_json::to_value(schema).map_err(|e| format!("args_schema: {e}")))
        .transpose()?;
    let declared: Vec<String> = schema
        .as_ref()
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .map(|properties| properties.keys().cloned().collect())
        .unwrap_or_default();
    let words = match &entry.command {
        CommandWords::Argv(words) => words.clone(),
        CommandWords::Line(line) => {
            jobd_command::split_command_line(line).map_err(|e| format!("command: {e}"))?
        }
    };
    // With a schema, a placeholder must name one of its properties; without
    // one, the placeholders make the schema.
    let allowed = if schema.is_some() {
        declared
    } else {
        placeholders(&words)
    };
    let parsed = Template::parse(&words, &allowed).map_err(|e| match e {
        jobd_command::TemplateError::UnknownField(field) => {
            format!("command: placeholder {{{field}}} is not a property of args_schema")
        }
        other => format!("command: {other}"),
    })?;
    let fields: Vec<String> = parsed.fields().map(str::to_owned).collect();
    let args_schema = match schema {
        Some(schema) => schema,
        // Placeholders without a schema: each is a required string,
        // number or boolean, and nothing else is accepted.
        None if !fields.is_empty() => serde_json::json!({
            "type": "object",
            "properties": fields
                .iter()
                .map(|f| (f.clone(), serde_json::json!({"type": ["string", "number", "boolean"]})))
                .collect::<serde_json::Map<_, _>>(),
            "required": fields,
            "additionalProperties": false,
        }),
        None => serde_json::json!({"description": "any JSON value, given to the program on stdin"}),
    };
    let template = if entry.allow_leading_dash {
        parsed
    } else {
        parsed.refuse_leading_dash()
    };
    let stdin_json = match entry.stdin.as_deref() {
        None => fields.is_empty(),
        Some("json") => true,
        Some("none") => false,
        Some(other) => return Err(format!("stdin: {other:?}: expected \"json\" or \"none\"")),
    };
    let result = match entry.result.as_deref() {
        None => ResultMode::Json,
        Some(word) => word.parse().map_err(|e| format!("result: {e}"))?,
    };
    let limits = match entry.limits {
        None => Limits::default(),
        Some(limits) => Limits {
            address_space: limits
                .memory
                .as_deref()
                .map(parse_bytes)
                .transpose()
                .map_err(|e| format!("limits.memory: {e}"))?,
            cpu_time: limits
                .cpu_time
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| format!("limits.cpu_time: {e}"))?,
            open_files: limits.open_files,
        },
    };
    Ok(CommandFunction {
        name: name.to_owned(),
        description: entry
            .description
            .unwrap_or_else(|| format!("Runs {}", words[0])),
        template,
        args_schema,
        stdin_json,
        timeout: entry
            .timeout
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| format!("timeout: {e}"))?,
        env: entry.env.into_iter().collect(),
        cwd: entry.cwd,
        result,
        max_output: entry
            .max_output
            .as_deref()
            .map(|raw| parse_bytes(raw).map(|b| usize::try_from(b).unwrap_or(usize::MAX)))
            .transpose()
            .map_err(|e| format!("max_output: {e}"))?,
        retry_safe: !entry.not_safe_to_retry,
        limits,
    })
}

/// The names between braces in `words` (`{{` is a literal brace): the
/// template parser checks each is well formed.
fn placeholders(words: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for word in words {
        let mut rest = word.as_str();
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            if let Some(stripped) = after.strip_prefix('{') {
                rest = stripped;
                continue;
            }
            match after.find('}') {
                Some(close) => {
                    names.push(after[..close].to_owned());
                    rest = &after[close + 1..];
                }
                None => break,
            }
        }
    }
    names
}

/// Registers `functions` on the blocking pool of `registry`. `helper` is
/// the binary that starts programs under limits: one whose `main` calls
/// [`jobd_command::exec_if_helper`] first (the `jobd` binary does; usually
/// `std::env::current_exe()`). It is checked now when a function has
/// limits.
///
/// # Errors
///
/// A function whose name the registry already has, or a helper that does
/// not answer as one, in one line.
pub fn register(
    registry: &mut Registry,
    functions: Vec<CommandFunction>,
    helper: &Path,
) -> Result<(), String> {
    if functions.iter().any(CommandFunction::has_limits) {
        jobd_command::probe_helper(helper)?;
    }
    for function in functions {
        if registry.get(&function.name).is_some() {
            return Err(format!(
                "command function {:?}: jobd has a function of that name already",
                function.name
            ));
        }
        let name = function.name.clone();
        let description = function.description.clone();
        let schema = function.args_schema.clone();
        let retry_safe = function.retry_safe;
        let function = Arc::new((function, helper.to_owned()));
        registry
            .register_blocking(&name, &description, move |ctx, args| {
                let (function, helper) = &*function;
                run(function, helper, &ctx, &args)
            })
            .try_with_args_schema(schema)
            .map_err(|e| e.to_string())?
            .returns("the program's stdout (as its `result` mode says)")
            // It is a process of its own already; and the pool's children
            // never read the file that declares it.
            .server_only();
        if !retry_safe {
            registry.not_safe_to_retry(&name);
        }
    }
    Ok(())
}

/// Runs one job's program to its end, on the calling blocking-pool thread.
fn run(
    function: &CommandFunction,
    helper: &Path,
    ctx: &Ctx,
    args: &Value,
) -> Result<Value, JobError> {
    let argv = function
        .template
        .render(args)
        .map_err(|e| JobError::bad_args(e.to_string()))?;
    let mut spec = function
        .environment(
            CommandSpec::from_argv(argv)
                .ok_or_else(|| JobError::failed("the command has no program"))?,
        )
        .limits(helper, function.limits);
    if function.stdin_json {
        let mut input = args.to_string().into_bytes();
        input.push(b'\n');
        spec = spec.stdin(input);
    }
    if let Some(limit) = function.timeout {
        spec = spec.timeout(limit);
    }
    if let Some(bytes) = function.max_output {
        spec = spec.max_output(bytes);
    }
    let (lines, mut written) = tokio::sync::mpsc::channel::<OutputLine>(1024);
    let spec = spec.lines(lines);
    let cancel = ctx.cancel_token();
    let finished = ctx.block_on(async {
        let forward = async {
            while let Some(line) = written.recv().await {
                let mut data = line.bytes;
                data.push(b'\n');
                let stream = match line.stream {
                    Stream::Stdout => LogStream::Stdout,
                    Stream::Stderr => LogStream::Stderr,
                };
                ctx.log_output(stream, &data);
            }
        };
        let (finished, ()) = tokio::join!(jobd_command::run(spec, &cancel), forward);
        finished
    });
    let finished = finished.map_err(|e| JobError::failed(e.to_string()))?;
    finished
        .into_outcome(function.result)
        .map_err(|failure| match failure.ending {
            Ending::TimedOut { .. } => JobError::TimedOut(failure.message),
            Ending::Cancelled { .. } => JobError::Cancelled,
            _ => JobError::failed(failure.message),
        })
}
