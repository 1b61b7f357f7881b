//! How values found in the input are quoted back in messages.

/// The most characters of a found value that a message quotes. A file that is not YAML at all
/// (a binary, a log) can be one value of many kilobytes; the start says what it is.
pub const MAX_QUOTED: usize = 80;

/// `value` quoted and escaped as `{:?}` does, cut to [`MAX_QUOTED`] characters with an
/// ellipsis inside the quotes and its length after them: `"aaaa…" (20001 characters)`.
pub fn quoted(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED) {
        None => format!("{value:?}"),
        Some((cut, _)) => {
            let head = format!("{:?}", &value[..cut]);
            format!(
                "{}…\" ({} characters)",
                &head[..head.len() - 1],
                value.chars().count()
            )
        }
    }
}

/// `value` cut to [`MAX_QUOTED`] characters with an ellipsis, unquoted: for names shown in
/// backticks or as a field path.
pub fn cut(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED) {
        None => value.to_owned(),
        Some((cut, _)) => format!("{}…", &value[..cut]),
    }
}

/// Writes `text` to standard output. A reader that went away (`canaryd status | head -1`) is
/// not an error: the rest is dropped, as other command-line tools do. Any other failure (a
/// full disk) is.
pub fn out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        assert_eq!(quoted("fast"), "\"fast\"");
        assert_eq!(quoted("a\"b"), "\"a\\\"b\"");
        let long = "é".repeat(200);
        let q = quoted(&long);
        assert_eq!(
            q,
            format!("\"{}…\" (200 characters)", "é".repeat(MAX_QUOTED))
        );
        assert_eq!(
            quoted(&"a".repeat(MAX_QUOTED)),
            format!("{:?}", "a".repeat(MAX_QUOTED))
        );
        assert_eq!(
            cut(&"x".repeat(MAX_QUOTED + 1)),
            format!("{}…", "x".repeat(MAX_QUOTED))
        );
        assert_eq!(cut("key"), "key");
    }
}
