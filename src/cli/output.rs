//! Output helpers shared by subcommands. `--json` output is JSON Lines: one object per line,
//! each with a `"type"` field naming what it describes (`candidate`, `report`, `output`, ...)
//! next to that object's own fields.

use serde::Serialize;

/// Prints one JSON Lines record of the given type.
pub fn json_line<T: Serialize>(kind: &str, data: &T) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(data)?;
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("type".into(), serde_json::Value::String(kind.into()));
    }
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

/// Prints a `report` record naming the file or folder written in `output`, as every writer's
/// report does.
pub fn report_line<T: Serialize>(data: &T, output: &std::path::Path) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(data)?;
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("output".into(), serde_json::json!(output));
    }
    json_line("report", &v)
}

/// A scale for a table cell: four decimals, or four significant digits in exponent form where
/// four decimals would print thirty digits (`alpha` 3e38) or none (a scale below 0.0001).
pub fn scale_cell(s: f32) -> String {
    let a = s.abs();
    if a == 0.0 || (1e-4..1e6).contains(&a) || !a.is_finite() {
        format!("{s:.4}")
    } else {
        format!("{s:.3e}")
    }
}

/// Left-aligned text table with a header row.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                // (padded by hand: a format width above 65535 would panic)
                s.push_str(c);
                let pad = widths[i].saturating_sub(c.chars().count()) + 2;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::scale_cell;

    #[test]
    fn scales_print_four_decimals_or_four_digits() {
        assert_eq!(scale_cell(2.0), "2.0000");
        assert_eq!(scale_cell(0.0), "0.0000");
        assert_eq!(scale_cell(-0.125), "-0.1250");
        assert_eq!(scale_cell(7.5e37), "7.500e37");
        assert_eq!(scale_cell(1.5e-6), "1.500e-6");
        assert_eq!(scale_cell(f32::INFINITY), "inf");
    }
}
