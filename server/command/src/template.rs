//! Argv templates: a command whose arguments are filled from a job's JSON
//! arguments. The point of a template is that a value can never change the
//! shape of the command: each `{name}` is replaced inside the one argv
//! element that holds it, so a value such as `; rm -rf /`, `$(id)` or
//! `a b` arrives as exactly one argument, with no shell, splitting or
//! globbing anywhere on the way. Everything that can be checked before a
//! job exists (placeholder syntax, unknown names, the program itself) is
//! checked when the template is parsed, so a bad template fails when a
//! function is registered, not on its first job.

use std::collections::BTreeSet;
use std::ffi::OsString;

use serde_json::Value;

use crate::argv::{SplitError, split_command_line};

/// A command whose argv elements may hold `{name}` placeholders, each
/// filled from the field `name` of a JSON object.
///
/// Syntax, per argv element: `{name}` is a placeholder (`name` is an ASCII
/// identifier: a letter or `_`, then letters, digits or `_`); `{{` and `}}`
/// stand for literal braces. An element may mix text and placeholders
/// (`--out={path}`, `{first}-{last}`), and always renders to exactly one
/// argv element, whatever the values hold. The program (the first element)
/// must be literal: a job chooses arguments, never what runs.
///
/// Rendering ([`Template::render`]) turns a JSON string into its text as it
/// is, a number or a boolean into its JSON text (`3`, `-1.5`, `true`), and
/// refuses `null`, arrays and objects. A value that starts with `-` is
/// passed on by default (it stays one element, but the program may read it
/// as an option); [`Template::refuse_leading_dash`] refuses it instead.
///
/// # Examples
///
/// ```
/// use jobd_command::Template;
/// use serde_json::json;
///
/// let template = Template::from_command_line("grep -c -e {pattern} -- {file}", ["pattern", "file"])?;
/// let argv = template.render(&json!({"pattern": "a b; rm -rf /", "file": "notes.txt"}))?;
/// assert_eq!(argv, ["grep", "-c", "-e", "a b; rm -rf /", "--", "notes.txt"]);
///
/// // Names are checked when the template is parsed.
/// assert!(Template::from_command_line("cat {nope}", ["file"]).is_err());
/// # Ok::<(), jobd_command::TemplateError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// One entry per argv element; the first is the program and holds
    /// text only.
    elements: Vec<Vec<Piece>>,
    /// Whether a value may put a `-` at the start of an element.
    refuse_leading_dash: bool,
}

/// A run of literal text or one placeholder inside an argv element.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(String),
}

/// Why a template could not be parsed or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The command line given to [`Template::from_command_line`] did not
    /// split into words.
    #[error(transparent)]
    Split(#[from] SplitError),
    /// There is no program, or it is the empty string.
    #[error("template has no program")]
    NoProgram,
    /// The program holds a placeholder; a job may choose arguments, never
    /// what runs.
    #[error("the program {0:?} may not hold a placeholder")]
    ProgramPlaceholder(String),
    /// A `{` with no `}` after it in the same element.
    #[error("unclosed `{{` in template element {0:?}")]
    UnclosedBrace(String),
    /// A `}` that closes nothing (write `}}` for a literal one).
    #[error("stray `}}` in template element {0:?} (write `}}}}` for a literal brace)")]
    StrayBrace(String),
    /// What stands between the braces is not an identifier.
    #[error("{{{name}}} in template element {element:?} is not a placeholder name")]
    BadPlaceholder {
        /// The element that holds it.
        element: String,
        /// What stood between the braces.
        name: String,
    },
    /// A placeholder names a field the function does not declare.
    #[error("unknown placeholder {{{0}}}")]
    UnknownField(String),
    /// A literal element holds a NUL byte, which no argv element can carry.
    #[error("template element {0:?} holds a NUL byte")]
    NulInTemplate(String),
    /// The arguments are not a JSON object, but placeholders need fields.
    #[error("arguments must be a JSON object, not {0}")]
    ArgsNotObject(&'static str),
    /// The arguments lack a field that a placeholder names.
    #[error("arguments have no field {0:?}")]
    MissingField(String),
    /// A field's value is `null`, an array or an object, which has no
    /// single-argument form.
    #[error("field {name:?} is {kind}; a placeholder takes a string, a number or a boolean")]
    UnsupportedValue {
        /// The field.
        name: String,
        /// What it held: "null", "an array" or "an object".
        kind: &'static str,
    },
    /// A field's string holds a NUL byte.
    #[error("field {0:?} holds a NUL byte")]
    NulInValue(String),
    /// A field's value would start an argv element with `-` (only with
    /// [`Template::refuse_leading_dash`]).
    #[error("field {0:?} starts with '-' where it could be taken for an option")]
    LeadingDash(String),
}

impl Template {
    /// Parses a template from argv elements, allowing placeholders that
    /// name one of `fields`.
    ///
    /// # Errors
    ///
    /// A [`TemplateError`] for no program, a placeholder in the program,
    /// bad brace syntax, a name not in `fields`, or a NUL byte.
    ///
    /// # Examples
    ///
    /// ```
    /// use jobd_command::Template;
    /// use serde_json::json;
    ///
    /// let template = Template::parse(["convert", "{input}", "-resize", "{size}%", "out.png"], ["input", "size"])?;
    /// let argv = template.render(&json!({"input": "my photo.jpg", "size": 50}))?;
    /// assert_eq!(argv, ["convert", "my photo.jpg", "-resize", "50%", "out.png"]);
    /// # Ok::<(), jobd_command::TemplateError>(())
    /// ```
    pub fn parse<A, S, F, N>(argv: A, fields: F) -> Result<Self, TemplateError>
    where
        A: IntoIterator<Item = S>,
        S: AsRef<str>,
        F: IntoIterator<Item = N>,
        N: AsRef<str>,
    {
        let known: BTreeSet<String> = fields
            .into_iter()
            .map(|name| name.as_ref().to_owned())
            .collect();
        let elements = argv
            .into_iter()
            .map(|element| parse_element(element.as_ref(), &known))
            .collect::<Result<Vec<_>, _>>()?;
        match elements.first() {
            Some(program) if program.iter().any(|piece| matches!(piece, Piece::Field(_))) => {
                return Err(TemplateError::ProgramPlaceholder(render_source(program)));
            }
            Some(program) if program != &[Piece::Text(String::new())] => {}
            _ => return Err(TemplateError::NoProgram),
        }
        Ok(Self {
            elements,
            refuse_leading_dash: false,
        })
    }

    /// Splits `line` with [`split_command_line`] (shell-like quoting, no
    /// shell), then parses the words as [`Template::parse`] does.
    ///
    /// Quotes only group words, and placeholders are found after
    /// splitting, so `'{name}'` and `{name}` mean the same: the value is
    /// one argument either way.
    ///
    /// # Errors
    ///
    /// [`TemplateError::Split`] when the line does not split, else as
    /// [`Template::parse`].
    pub fn from_command_line<F, N>(line: &str, fields: F) -> Result<Self, TemplateError>
    where
        F: IntoIterator<Item = N>,
        N: AsRef<str>,
    {
        Self::parse(split_command_line(line)?, fields)
    }

    /// Refuses, when rendering, a value that would put a `-` at the start
    /// of an argv element (so the program cannot mistake it for an
    /// option). Negative numbers count too.
    ///
    /// # Examples
    ///
    /// ```
    /// use jobd_command::{Template, TemplateError};
    /// use serde_json::json;
    ///
    /// let template = Template::parse(["rm", "--", "{file}"], ["file"])?;
    /// assert_eq!(template.render(&json!({"file": "-rf"}))?, ["rm", "--", "-rf"]);
    ///
    /// let strict = template.refuse_leading_dash();
    /// assert_eq!(
    ///     strict.render(&json!({"file": "-rf"})),
    ///     Err(TemplateError::LeadingDash("file".into())),
    /// );
    /// # Ok::<(), TemplateError>(())
    /// ```
    #[must_use]
    pub fn refuse_leading_dash(mut self) -> Self {
        self.refuse_leading_dash = true;
        self
    }

    /// The program, argv\[0\]: literal text, since a placeholder may not
    /// name it.
    ///
    /// ```
    /// let template = jobd_command::Template::parse(["wc", "-c", "{file}"], ["file"])?;
    /// assert_eq!(template.program(), "wc");
    /// # Ok::<(), jobd_command::TemplateError>(())
    /// ```
    #[must_use]
    pub fn program(&self) -> String {
        self.elements
            .first()
            .into_iter()
            .flatten()
            .map(|piece| match piece {
                Piece::Text(text) => text.as_str(),
                // Refused by `parse`: the program is never a placeholder.
                Piece::Field(_) => "",
            })
            .collect()
    }

    /// The names the placeholders use, each once, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        let mut seen = BTreeSet::new();
        self.elements
            .iter()
            .flatten()
            .filter_map(|piece| match piece {
                Piece::Field(name) => Some(name.as_str()),
                Piece::Text(_) => None,
            })
            .filter(move |name| seen.insert(*name))
    }

    /// Fills every placeholder from the fields of `args` and returns the
    /// argv, program first. Each template element gives exactly one argv
    /// element.
    ///
    /// A template without placeholders ignores `args`.
    ///
    /// # Errors
    ///
    /// [`TemplateError::ArgsNotObject`], [`TemplateError::MissingField`],
    /// [`TemplateError::UnsupportedValue`] (`null`, an array or an object),
    /// [`TemplateError::NulInValue`], and [`TemplateError::LeadingDash`]
    /// when [`Template::refuse_leading_dash`] is set.
    ///
    /// # Examples
    ///
    /// ```
    /// use jobd_command::Template;
    /// use serde_json::json;
    ///
    /// let template = Template::parse(["seq", "{first}", "{last}"], ["first", "last"])?;
    /// assert_eq!(template.render(&json!({"first": 1, "last": 2.5}))?, ["seq", "1", "2.5"]);
    /// assert!(template.render(&json!({"first": 1, "last": null})).is_err());
    /// assert!(template.render(&json!([1, 2])).is_err());
    /// # Ok::<(), jobd_command::TemplateError>(())
    /// ```
    pub fn render(&self, args: &Value) -> Result<Vec<OsString>, TemplateError> {
        let has_fields = self
            .elements
            .iter()
            .flatten()
            .any(|piece| matches!(piece, Piece::Field(_)));
        let object = match args {
            Value::Object(object) => Some(object),
            _ if !has_fields => None,
            other => return Err(TemplateError::ArgsNotObject(json_kind(other))),
        };
        self.elements
            .iter()
            .map(|pieces| {
                let mut element = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(text) => element.push_str(text),
                        Piece::Field(name) => {
                            let value = object
                                .and_then(|object| object.get(name))
                                .ok_or_else(|| TemplateError::MissingField(name.clone()))?;
                            let text = scalar_text(name, value)?;
                            if self.refuse_leading_dash
                                && element.is_empty()
                                && text.starts_with('-')
                            {
                                return Err(TemplateError::LeadingDash(name.clone()));
                            }
                            element.push_str(&text);
                        }
                    }
                }
                Ok(OsString::from(element))
            })
            .collect()
    }
}

/// Parses one argv element into text runs and placeholders.
fn parse_element(element: &str, known: &BTreeSet<String>) -> Result<Vec<Piece>, TemplateError> {
    if element.contains('\0') {
        return Err(TemplateError::NulInTemplate(element.to_owned()));
    }
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = element;
    while let Some(at) = rest.find(['{', '}']) {
        text.push_str(&rest[..at]);
        let brace = &rest[at..];
        if let Some(after) = brace
            .strip_prefix("{{")
            .or_else(|| brace.strip_prefix("}}"))
        {
            text.push_str(&brace[..1]);
            rest = after;
        } else if brace.starts_with('}') {
            return Err(TemplateError::StrayBrace(element.to_owned()));
        } else {
            let close = brace
                .find('}')
                .ok_or_else(|| TemplateError::UnclosedBrace(element.to_owned()))?;
            let name = &brace[1..close];
            if !is_identifier(name) {
                return Err(TemplateError::BadPlaceholder {
                    element: element.to_owned(),
                    name: name.to_owned(),
                });
            }
            if !known.contains(name) {
                return Err(TemplateError::UnknownField(name.to_owned()));
            }
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Field(name.to_owned()));
            rest = &brace[close + 1..];
        }
    }
    text.push_str(rest);
    // An empty element stays an (empty) argument, as `""` in a shell.
    if !text.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// The template syntax of an element again, for error messages.
fn render_source(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|piece| match piece {
            Piece::Text(text) => text.replace('{', "{{").replace('}', "}}"),
            Piece::Field(name) => format!("{{{name}}}"),
        })
        .collect()
}

/// Whether `name` is an ASCII identifier (letter or `_`, then letters,
/// digits or `_`).
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The one-argument text of a scalar JSON value.
fn scalar_text(name: &str, value: &Value) -> Result<String, TemplateError> {
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        Value::Null | Value::Array(_) | Value::Object(_) => {
            return Err(TemplateError::UnsupportedValue {
                name: name.to_owned(),
                kind: json_kind(value),
            });
        }
    };
    if text.contains('\0') {
        return Err(TemplateError::NulInValue(name.to_owned()));
    }
    Ok(text)
}

/// How an error message names the kind of a JSON value.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn strings(argv: Vec<OsString>) -> Vec<String> {
        argv.into_iter()
            .map(|arg| arg.into_string().unwrap())
            .collect()
    }

    #[test]
    fn placeholders_fill_inside_one_element() {
        let template = Template::parse(
            ["cmd", "--out={dir}/{name}.txt", "{name}", "x"],
            ["dir", "name"],
        )
        .unwrap();
        let argv = template
            .render(&json!({"dir": "/tmp/a b", "name": "c d"}))
            .unwrap();
        assert_eq!(strings(argv), ["cmd", "--out=/tmp/a b/c d.txt", "c d", "x"]);
        assert_eq!(template.fields().collect::<Vec<_>>(), ["dir", "name"]);
    }

    #[test]
    fn doubled_braces_are_literal() {
        let template = Template::parse(["jq", "{{a: {v}}}", "{{}}"], ["v"]).unwrap();
        assert_eq!(
            strings(template.render(&json!({"v": 1})).unwrap()),
            ["jq", "{a: 1}", "{}"]
        );
    }

    #[test]
    fn scalars_render_as_json_text() {
        let template = Template::parse(["p", "{v}"], ["v"]).unwrap();
        for (value, text) in [
            (json!("as is"), "as is"),
            (json!(""), ""),
            (json!(3), "3"),
            (json!(-1.5), "-1.5"),
            (json!(true), "true"),
            (json!(false), "false"),
        ] {
            assert_eq!(
                strings(template.render(&json!({ "v": value })).unwrap()),
                ["p", text]
            );
        }
    }

    #[test]
    fn non_scalars_and_missing_fields_are_refused() {
        let template = Template::parse(["p", "{v}"], ["v"]).unwrap();
        for (value, kind) in [
            (json!(null), "null"),
            (json!([1]), "an array"),
            (json!({"a": 1}), "an object"),
        ] {
            assert_eq!(
                template.render(&json!({ "v": value })),
                Err(TemplateError::UnsupportedValue {
                    name: "v".into(),
                    kind
                })
            );
        }
        assert_eq!(
            template.render(&json!({})),
            Err(TemplateError::MissingField("v".into()))
        );
        assert_eq!(
            template.render(&json!("v")),
            Err(TemplateError::ArgsNotObject("a string"))
        );
        assert_eq!(
            template.render(&json!({"v": "a\0b"})),
            Err(TemplateError::NulInValue("v".into()))
        );
    }

    #[test]
    fn a_template_without_placeholders_ignores_its_arguments() {
        let template = Template::parse(["date", "-u"], [] as [&str; 0]).unwrap();
        assert_eq!(
            strings(template.render(&json!(null)).unwrap()),
            ["date", "-u"]
        );
    }

    #[test]
    fn parse_refuses_bad_templates() {
        let parse = |argv: &[&str]| Template::parse(argv, ["ok"]);
        assert_eq!(parse(&[]), Err(TemplateError::NoProgram));
        assert_eq!(parse(&[""]), Err(TemplateError::NoProgram));
        assert_eq!(
            parse(&["{ok}"]),
            Err(TemplateError::ProgramPlaceholder("{ok}".into()))
        );
        assert_eq!(
            parse(&["/bin/{ok}"]),
            Err(TemplateError::ProgramPlaceholder("/bin/{ok}".into()))
        );
        assert_eq!(
            parse(&["p", "{nope}"]),
            Err(TemplateError::UnknownField("nope".into()))
        );
        assert_eq!(
            parse(&["p", "a{ok"]),
            Err(TemplateError::UnclosedBrace("a{ok".into()))
        );
        assert_eq!(
            parse(&["p", "a}"]),
            Err(TemplateError::StrayBrace("a}".into()))
        );
        for name in ["", "1x", "a b", "a-b", "$(id)"] {
            assert_eq!(
                parse(&["p", &format!("{{{name}}}")]),
                Err(TemplateError::BadPlaceholder {
                    element: format!("{{{name}}}"),
                    name: name.into()
                }),
                "{name:?}"
            );
        }
        assert_eq!(
            parse(&["p", "a\0"]),
            Err(TemplateError::NulInTemplate("a\0".into()))
        );
        assert!(matches!(
            Template::from_command_line("p '{ok}", ["ok"]),
            Err(TemplateError::Split(SplitError::Unbalanced(_)))
        ));
    }

    #[test]
    fn refuse_leading_dash_looks_only_at_the_start_of_an_element() {
        let template = Template::parse(["p", "{a}{b}", "--x={a}", "n{b}"], ["a", "b"])
            .unwrap()
            .refuse_leading_dash();
        assert_eq!(
            template.render(&json!({"a": "", "b": "-x"})),
            Err(TemplateError::LeadingDash("b".into()))
        );
        assert_eq!(
            template.render(&json!({"a": -1, "b": "y"})),
            Err(TemplateError::LeadingDash("a".into()))
        );
        assert_eq!(
            strings(template.render(&json!({"a": "a", "b": "-y"})).unwrap()),
            ["p", "a-y", "--x=a", "n-y"]
        );
    }

    #[test]
    fn empty_elements_stay_arguments() {
        let template = Template::parse(["p", "", "{v}"], ["v"]).unwrap();
        assert_eq!(
            strings(template.render(&json!({"v": ""})).unwrap()),
            ["p", "", ""]
        );
    }
}
