//! Regular expressions from adapter configs are Python `re` patterns (PEFT evaluates them) but
//! onnx-lora evaluates them with the `regex` crate: this checks that a pattern stays in the
//! part of the syntax both read alike, and refuses the constructs whose meaning differs (a
//! pattern Rust accepts but Python reads otherwise would silently select other modules).

/// Ok when `pattern` means the same to Python's `re` and to the `regex` crate (as far as module
/// paths go: no newlines); otherwise what it uses that they read differently.
pub fn check(pattern: &str) -> Result<(), String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    let differs =
        |what: &str| format!("it uses {what}, which Python's re reads differently or rejects");
    // What the last token was: a quantifier may follow only an atom, or a quantifier once as
    // its lazy `?` (Python reads `*+` as possessive and rejects `**`; Rust nests them).
    #[derive(PartialEq)]
    enum Last {
        Atom,
        Quantifier,
        Lazy,
    }
    let mut last = Last::Atom;
    while i < chars.len() {
        let is_quantifier = matches!(chars[i], '*' | '+' | '?')
            || (chars[i] == '{' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        if is_quantifier {
            last = match last {
                Last::Quantifier if chars[i] == '?' => Last::Lazy,
                Last::Quantifier | Last::Lazy => {
                    return Err(differs(
                        "a quantifier right after another (possessive in Python)",
                    ));
                }
                Last::Atom => Last::Quantifier,
            };
        } else {
            last = Last::Atom;
        }
        match chars[i] {
            '\\' => {
                i = escape(&chars, i + 1, false).map_err(|w| differs(&w))?;
                continue;
            }
            '(' if chars.get(i + 1) == Some(&'?') => {
                let rest: String = chars[i + 2..].iter().take(2).collect();
                if rest.starts_with(':') {
                    i += 3;
                } else if rest == "P<" {
                    i += 4;
                } else {
                    return Err(differs("an inline flag or special group '(?'"));
                }
                continue;
            }
            '{' => {
                // Python reads a `{` that starts no valid repetition as a literal; Rust refuses
                // it, or for `{,n}` reads what Python does not.
                let mut j = i + 1;
                let digits = |j: &mut usize| {
                    let start = *j;
                    while chars.get(*j).is_some_and(char::is_ascii_digit) {
                        *j += 1;
                    }
                    *j > start
                };
                let ok = digits(&mut j) && {
                    if chars.get(j) == Some(&',') {
                        j += 1;
                        digits(&mut j);
                    }
                    chars.get(j) == Some(&'}')
                };
                if !ok {
                    return Err(differs("a '{' that is not a repetition {m}, {m,} or {m,n}"));
                }
                i = j + 1;
                continue;
            }
            '[' => {
                i = class(&chars, i + 1).map_err(|w| differs(&w))?;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Checks the escape whose character is at `i`; returns the index after it.
fn escape(chars: &[char], i: usize, in_class: bool) -> Result<usize, String> {
    let Some(&c) = chars.get(i) else {
        return Err("a trailing '\\'".into());
    };
    let hex =
        |n: usize| (i + 1..i + 1 + n).all(|j| chars.get(j).is_some_and(char::is_ascii_hexdigit));
    match c {
        'd' | 'D' | 'w' | 'W' | 's' | 'S' | 'n' | 't' | 'r' | 'f' | 'v' | 'a' => Ok(i + 1),
        'b' | 'B' | 'A' if !in_class && chars.get(i + 1) != Some(&'{') => Ok(i + 1),
        'x' if hex(2) => Ok(i + 3),
        'u' if hex(4) => Ok(i + 5),
        'U' if hex(8) => Ok(i + 9),
        '<' | '>' => Err(format!(
            "'\\{c}' (a word boundary in Rust, a literal in Python)"
        )),
        c if c.is_ascii_alphanumeric() => Err(format!("the escape '\\{c}'")),
        _ => Ok(i + 1),
    }
}

/// Checks the character class whose body starts at `i` (after `[`); returns the index after
/// its closing `]`.
fn class(chars: &[char], mut i: usize) -> Result<usize, String> {
    if chars.get(i) == Some(&'^') {
        i += 1;
    }
    if chars.get(i) == Some(&']') {
        i += 1; // a leading `]` is a literal in both
    }
    while let Some(&c) = chars.get(i) {
        match c {
            ']' => return Ok(i + 1),
            '\\' => {
                i = escape(chars, i + 1, true)?;
                continue;
            }
            // Rust: a nested class, `[:alpha:]`, or a set operation; Python: literals.
            '[' => return Err("'[' inside a character class".into()),
            '&' | '-' | '~' if chars.get(i + 1) == Some(&c) => {
                return Err(format!("'{c}{c}' inside a character class"));
            }
            _ => {}
        }
        i += 1;
    }
    Err("an unclosed '['".into())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn common_syntax_passes_and_dialect_differences_do_not() {
        for ok in [
            r"q_proj",
            r".*\.layers\.[0-9]+\.self_attn\.(q|k|v)_proj",
            r"model\.layers\.\d{1,2}\..*",
            r"(?:up|down)_proj",
            r"(?P<l>\d+)\.mlp",
            r"[^.]+\.w[]a-]",
            r"\x71_proj",
            r".*?q_proj",
            r"a+?b??c{1,2}?",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for bad in [
            r"[[:alpha:]]_proj",
            r"[a-z&&[^q]]_proj",
            r"(?i)q_proj",
            r"q(?=_proj)",
            r"\x{71}",
            r"\p{L}",
            r"q_proj\z",
            r"\<q_proj",
            r"a{,2}",
            r"a{x}",
            r"[a",
            r"\b{start}q",
            "q\\",
            r".*+_proj",
            r"a**",
            r"a{1}{1}",
            r"a*?+",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }
}
