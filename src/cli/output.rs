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
