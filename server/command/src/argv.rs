//! Command lines into argv words. A command is always a program and its
//! arguments handed to `execve` as they are, never a string given to a
//! shell: nothing is expanded, globbed or substituted, so no value that
//! reaches an argument can start a second command.

/// Why a command line could not be split into words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// A quote was opened and never closed, or the line ends in a lone
    /// backslash.
    #[error("unbalanced quote or trailing backslash in command line {0:?}")]
    Unbalanced(String),
    /// The line has no words at all (empty, blank, or only a comment).
    #[error("command line has no program")]
    Empty,
    /// A word holds a NUL byte, which no argv element can carry.
    #[error("command line holds a NUL byte")]
    NulByte,
}

/// Splits a command line into argv words with POSIX-shell quoting rules,
/// without running a shell.
///
/// Quoting (`'...'`, `"..."`, backslash) only groups characters into words:
/// `$VAR`, `$(...)`, backticks, globs, `;`, `|`, `&&` and redirections are
/// plain characters of a word. As in a shell, an unquoted `#` at the start
/// of a word begins a comment that runs to the end of the line.
///
/// # Errors
///
/// [`SplitError::Unbalanced`] for an unclosed quote or a trailing
/// backslash, [`SplitError::Empty`] when no word is left, and
/// [`SplitError::NulByte`] when a word would hold a NUL byte.
///
/// # Examples
///
/// ```
/// use jobd_command::split_command_line;
///
/// assert_eq!(split_command_line("tr a-z A-Z").unwrap(), ["tr", "a-z", "A-Z"]);
/// assert_eq!(
///     split_command_line(r#"grep -e "two words" 'it''s'"#).unwrap(),
///     ["grep", "-e", "two words", "its"],
/// );
/// // Shell syntax is just text: this is `echo` with three arguments.
/// assert_eq!(split_command_line("echo $(id) ;").unwrap(), ["echo", "$(id)", ";"]);
/// assert!(split_command_line("echo 'unclosed").is_err());
/// ```
pub fn split_command_line(line: &str) -> Result<Vec<String>, SplitError> {
    let words = shlex::split(line).ok_or_else(|| SplitError::Unbalanced(line.to_owned()))?;
    if words.is_empty() {
        return Err(SplitError::Empty);
    }
    if words.iter().any(|word| word.contains('\0')) {
        return Err(SplitError::NulByte);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_split_on_blanks() {
        assert_eq!(
            split_command_line("  tr\ta-z   A-Z ").unwrap(),
            ["tr", "a-z", "A-Z"]
        );
    }

    #[test]
    fn quotes_group_words_and_shell_syntax_stays_literal() {
        assert_eq!(
            split_command_line(r#"printf '%s\n' "a b" c\ d '$(id)' `id` ; rm -rf / | x > y"#)
                .unwrap(),
            [
                "printf", "%s\\n", "a b", "c d", "$(id)", "`id`", ";", "rm", "-rf", "/", "|", "x",
                ">", "y"
            ]
        );
    }

    #[test]
    fn unbalanced_quotes_and_a_trailing_backslash_are_errors() {
        for line in ["echo 'a", "echo \"a", "echo a\\"] {
            assert_eq!(
                split_command_line(line),
                Err(SplitError::Unbalanced(line.to_owned())),
                "{line}"
            );
        }
    }

    #[test]
    fn a_line_without_words_is_an_error() {
        for line in ["", "   ", "# only a comment"] {
            assert_eq!(split_command_line(line), Err(SplitError::Empty), "{line:?}");
        }
    }

    #[test]
    fn a_nul_byte_is_an_error() {
        assert_eq!(split_command_line("echo a\0b"), Err(SplitError::NulByte));
    }
}
