//! Output: tables like kubectl's, and -o yaml|json|name|wide.

use serde_json::Value;
use skiff_api::{meta, table, Resource};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Wide,
    Yaml,
    Json,
    Name,
}

impl Format {
    pub fn parse(s: Option<&str>) -> anyhow::Result<Self> {
        Ok(match s {
            None => Format::Table,
            Some("wide") => Format::Wide,
            Some("yaml") => Format::Yaml,
            Some("json") => Format::Json,
            Some("name") => Format::Name,
            Some(o) => anyhow::bail!("unable to match a printer suitable for the output format {o:?}, allowed formats are: json,name,wide,yaml"),
        })
    }
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Prints rows aligned in columns, as kubectl's tabwriter does (3 spaces between columns).
pub fn print_rows(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// A table of `objects` of one resource. `prefix_kind` adds `kind/` to names (several types).
pub fn table(
    r: &Resource,
    objects: &[Value],
    fmt: Format,
    all_ns: bool,
    prefix_kind: bool,
    show_labels: bool,
) {
    let cols = table::columns(r.kind);
    let wide = fmt == Format::Wide;
    let keep: Vec<usize> = cols
        .iter()
        .enumerate()
        .filter(|(_, c)| wide || !c.wide)
        .map(|(i, _)| i)
        .collect();
    let mut rows = Vec::new();
    let mut header: Vec<String> = keep.iter().map(|i| cols[*i].name.to_string()).collect();
    if all_ns && r.namespaced {
        header.insert(0, "NAMESPACE".into());
    }
    if show_labels {
        header.push("LABELS".into());
    }
    rows.push(header);
    let t = now();
    for o in objects {
        let cells = table::row(r.kind, o, t);
        let mut row: Vec<String> = keep
            .iter()
            .map(|i| cells.get(*i).cloned().unwrap_or_default())
            .collect();
        if prefix_kind && r.kind != "Event" {
            row[0] = format!(
                "{}/{}",
                if r.group.is_empty() {
                    r.singular.to_string()
                } else {
                    format!("{}.{}", r.singular, r.group)
                },
                row[0]
            );
        }
        if all_ns && r.namespaced {
            row.insert(0, meta::namespace(o).unwrap_or("").to_string());
        }
        if show_labels {
            let l: Vec<String> = meta::labels(o)
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            row.push(if l.is_empty() {
                "<none>".into()
            } else {
                l.join(",")
            });
        }
        rows.push(row);
    }
    print_rows(&rows);
}

pub fn structured(objects: &[Value], single: bool, fmt: Format) -> anyhow::Result<()> {
    let v = if single && objects.len() == 1 {
        objects[0].clone()
    } else {
        serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": objects})
    };
    match fmt {
        Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(&v)?),
        _ => {}
    }
    Ok(())
}

pub fn name_of(r: &Resource, o: &Value) -> String {
    let kind = if r.group.is_empty() {
        r.singular.to_string()
    } else {
        format!("{}.{}", r.singular, r.group)
    };
    format!("{kind}/{}", meta::name(o))
}
