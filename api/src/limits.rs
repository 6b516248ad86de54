//! What a request may carry, and the cheap checks that hold it to that before any parser or
//! patch engine spends time or memory on it.
//!
//! The numbers are the Kubernetes API server's where it has one:
//! - a request body is at most 3 MiB (`MaxRequestBodyBytes`, 413);
//! - a JSON patch has at most 10,000 operations (413), and its `copy` operations may add at
//!   most 3 MiB to the document (`JSONPatchMaxCopyBytes`, 422);
//! - a ConfigMap's or Secret's data is at most 1 MiB in all (422, `Too long`);
//! - a stored object is at most 1.5 MiB, etcd's default request limit (413).
//!
//! Nesting depth: Go's `encoding/json` (and `sigs.k8s.io/json`) stop at 10,000 levels, and
//! go-yaml's scanner at 10,000 flow levels or indents. Here the decoders themselves stop much
//! earlier — `serde_json` and `serde_yaml` refuse more than 128 levels — but only after a YAML
//! body has been scanned, and libyaml's scanner costs time proportional to the flow depth for
//! every token: a body of nothing but `[` would take minutes. So the depth is checked first, by
//! a scan that follows the tokenizer's rules without building anything, and a body nested
//! deeper than [`MAX_DEPTH`] (100, below the decoders' own limit and far above any object the
//! API serves) is refused with 400 before a parser sees it.

use crate::error::ApiError;

/// Largest accepted request body, as the Kubernetes API server's default (3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Deepest nesting of arrays and objects a JSON or YAML body may have.
pub const MAX_DEPTH: usize = 100;
/// Most operations a JSON patch may have, as Kubernetes.
pub const MAX_JSON_PATCH_OPS: usize = 10_000;
/// Most bytes the `copy` operations of one JSON patch may add, as Kubernetes'
/// `JSONPatchMaxCopyBytes`.
pub const MAX_JSON_PATCH_COPY_BYTES: usize = 3 * 1024 * 1024;
/// Largest object the store keeps, as etcd's default request limit (1.5 MiB).
pub const MAX_OBJECT_BYTES: usize = 3 * 512 * 1024;
/// Most bytes of data a ConfigMap or a Secret may hold, as Kubernetes (1 MiB).
pub const MAX_DATA_BYTES: usize = 1024 * 1024;

/// The error of an object larger than the store keeps, worded as Kubernetes relays etcd's.
pub fn object_too_large() -> ApiError {
    ApiError::too_large("etcdserver: request is too large")
}

fn too_deep(format: &str) -> ApiError {
    ApiError::bad_request(format!(
        "error decoding {format}: exceeded max depth of {MAX_DEPTH}"
    ))
}

/// Refuses a JSON text nested deeper than [`MAX_DEPTH`]. Linear, allocation-free; it does not
/// check the text is valid JSON (the decoder does).
pub fn check_json_depth(bytes: &[u8]) -> Result<(), ApiError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(too_deep("JSON"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Refuses a YAML text nested deeper than [`MAX_DEPTH`] (flow collections and block
/// collections counted together), or one in an encoding other than UTF-8.
///
/// What is counted are the tokenizer's levels — open flow collections and indentation
/// levels — which are what libyaml's time grows with. Two structures nest without a level of
/// their own (a single-pair mapping inside a flow sequence, `[a: b]`, and a sequence at its
/// key's indentation), so a parsed value can be up to twice as deep as the count; the decoder's
/// own limit (128) refuses those, in time linear in their size.
///
/// The scan follows libyaml's scanner (which `serde_yaml` runs) closely enough to find the
/// same token boundaries — quoted, plain and block scalars, comments, anchors and tags, the
/// indentation that ends a block scalar or continues a plain one — so brackets inside scalars
/// neither count nor hide real ones. Where libyaml would stop with an error, what the scan
/// finds after that point does not matter: the parser never gets there.
pub fn check_yaml_depth(bytes: &[u8]) -> Result<(), ApiError> {
    yaml_depth(bytes, MAX_DEPTH).map(|_| ())
}

/// The deepest nesting the scan found, or an error once it passed `limit`.
fn yaml_depth(bytes: &[u8], limit: usize) -> Result<usize, ApiError> {
    // libyaml reads UTF-16 when the text starts with its byte order mark; this scan reads bytes.
    if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        return Err(ApiError::bad_request(
            "error decoding YAML: only UTF-8 is accepted",
        ));
    }
    let mut s = YamlScan {
        c: Cursor {
            b: bytes,
            pos: 0,
            line: 0,
            col: 0,
        },
        flow: 0,
        indents: Vec::new(),
        simple_key_allowed: true,
        key: None,
        limit,
        max: 0,
    };
    if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        s.c.pos = 3;
    }
    s.run()?;
    Ok(s.max)
}

/// A position in the text, with libyaml's line and column (in characters).
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    line: usize,
    col: usize,
}

impl Cursor<'_> {
    fn at(&self, off: usize) -> Option<u8> {
        self.b.get(self.pos + off).copied()
    }
    fn is(&self, off: usize, c: u8) -> bool {
        self.at(off) == Some(c)
    }
    fn eof(&self) -> bool {
        self.pos >= self.b.len()
    }
    /// The length of the line break at `off`, if there is one (`\r\n`, `\r`, `\n`, NEL, LS, PS).
    fn brk_at(&self, off: usize) -> Option<usize> {
        match (self.at(off), self.at(off + 1), self.at(off + 2)) {
            (Some(b'\r'), Some(b'\n'), _) => Some(2),
            (Some(b'\r' | b'\n'), _, _) => Some(1),
            (Some(0xC2), Some(0x85), _) => Some(2),
            (Some(0xE2), Some(0x80), Some(0xA8 | 0xA9)) => Some(3),
            _ => None,
        }
    }
    fn brk(&self) -> bool {
        self.brk_at(0).is_some()
    }
    fn blank_at(&self, off: usize) -> bool {
        matches!(self.at(off), Some(b' ' | b'\t'))
    }
    fn blank(&self) -> bool {
        self.blank_at(0)
    }
    /// Blank, a line break or the end of the text.
    fn blankz_at(&self, off: usize) -> bool {
        self.at(off).is_none() || self.blank_at(off) || self.brk_at(off).is_some()
    }
    fn blankz(&self) -> bool {
        self.blankz_at(0)
    }
    /// Moves past one character (a line break counts as one and starts a new line).
    fn skip(&mut self) {
        if let Some(n) = self.brk_at(0) {
            self.pos += n;
            self.line += 1;
            self.col = 0;
            return;
        }
        let n = match self.at(0) {
            None => return,
            Some(b) if b < 0x80 => 1,
            Some(b) if b >= 0xF0 => 4,
            Some(b) if b >= 0xE0 => 3,
            Some(b) if b >= 0xC0 => 2,
            Some(_) => 1,
        };
        self.pos = (self.pos + n).min(self.b.len());
        self.col += 1;
    }
    fn skip_to_line_end(&mut self) {
        while !self.eof() && !self.brk() {
            self.skip();
        }
    }
}

/// libyaml's anchor and alias characters.
fn is_alpha(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// The characters of a tag's suffix (a verbatim `!<…>` tag also takes `,`, `[` and `]`).
fn is_tag_char(b: u8) -> bool {
    is_alpha(b) || b";/?:@&=+$.%!~*'()".contains(&b)
}

struct YamlScan<'a> {
    c: Cursor<'a>,
    /// Open flow collections.
    flow: usize,
    /// The block collections' columns (libyaml's indent stack; the current indent is the last,
    /// or -1).
    indents: Vec<usize>,
    simple_key_allowed: bool,
    /// Where a possible simple key starts (line, column).
    key: Option<(usize, usize)>,
    limit: usize,
    /// The deepest nesting seen.
    max: usize,
}

impl YamlScan<'_> {
    fn indent(&self) -> isize {
        self.indents.last().map_or(-1, |&i| i as isize)
    }

    fn check_depth(&mut self) -> Result<(), ApiError> {
        self.max = self.max.max(self.flow + self.indents.len());
        if self.max > self.limit {
            return Err(too_deep("YAML"));
        }
        Ok(())
    }

    fn roll_indent(&mut self, col: usize) -> Result<(), ApiError> {
        if self.flow == 0 && self.indent() < col as isize {
            self.indents.push(col);
            self.check_depth()?;
        }
        Ok(())
    }

    fn save_key(&mut self) {
        if self.simple_key_allowed {
            self.key = Some((self.c.line, self.c.col));
        }
    }

    fn run(&mut self) -> Result<(), ApiError> {
        loop {
            self.skip_to_next_token();
            if self.key.is_some_and(|(line, _)| line < self.c.line) {
                self.key = None;
            }
            if self.flow == 0 {
                while self.indent() > self.c.col as isize {
                    self.indents.pop();
                }
            }
            let Some(ch) = self.c.at(0) else {
                return Ok(());
            };
            let c = &self.c;
            let col0 = c.col == 0;
            if col0 && ch == b'%' {
                self.c.skip_to_line_end();
                continue;
            }
            if col0
                && ((c.is(0, b'-') && c.is(1, b'-') && c.is(2, b'-'))
                    || (c.is(0, b'.') && c.is(1, b'.') && c.is(2, b'.')))
                && c.blankz_at(3)
            {
                self.indents.clear();
                self.key = None;
                self.simple_key_allowed = false;
                for _ in 0..3 {
                    self.c.skip();
                }
                continue;
            }
            match ch {
                b'[' | b'{' => {
                    self.save_key();
                    self.flow += 1;
                    self.check_depth()?;
                    self.simple_key_allowed = true;
                    self.c.skip();
                }
                b']' | b'}' => {
                    self.key = None;
                    self.flow = self.flow.saturating_sub(1);
                    self.simple_key_allowed = false;
                    self.c.skip();
                }
                b',' => {
                    self.key = None;
                    self.simple_key_allowed = true;
                    self.c.skip();
                }
                b'-' if c.blankz_at(1) => {
                    let col = c.col;
                    self.roll_indent(col)?;
                    self.key = None;
                    self.simple_key_allowed = true;
                    self.c.skip();
                }
                b'?' if self.flow > 0 || c.blankz_at(1) => {
                    let col = c.col;
                    self.roll_indent(col)?;
                    self.key = None;
                    self.simple_key_allowed = self.flow == 0;
                    self.c.skip();
                }
                b':' if self.flow > 0 || c.blankz_at(1) => {
                    match self.key.take() {
                        Some((_, key_col)) => {
                            self.roll_indent(key_col)?;
                            self.simple_key_allowed = false;
                        }
                        None => {
                            let col = c.col;
                            self.roll_indent(col)?;
                            self.simple_key_allowed = self.flow == 0;
                        }
                    }
                    self.c.skip();
                }
                b'*' | b'&' => {
                    self.save_key();
                    self.simple_key_allowed = false;
                    self.c.skip();
                    while self.c.at(0).is_some_and(is_alpha) {
                        self.c.skip();
                    }
                }
                b'!' => {
                    self.save_key();
                    self.simple_key_allowed = false;
                    self.tag();
                }
                b'|' | b'>' if self.flow == 0 => {
                    self.key = None;
                    self.simple_key_allowed = true;
                    self.block_scalar();
                }
                b'\'' | b'"' => {
                    self.save_key();
                    self.simple_key_allowed = false;
                    self.quoted(ch);
                }
                _ => {
                    self.save_key();
                    self.simple_key_allowed = false;
                    if self.plain() {
                        self.simple_key_allowed = true;
                    }
                }
            }
        }
    }

    /// Skips spaces, comments and line breaks (tabs too, except where they would indent).
    fn skip_to_next_token(&mut self) {
        loop {
            while self.c.is(0, b' ')
                || ((self.flow > 0 || !self.simple_key_allowed) && self.c.is(0, b'\t'))
            {
                self.c.skip();
            }
            if self.c.is(0, b'#') {
                self.c.skip_to_line_end();
            }
            if self.c.brk() {
                self.c.skip();
                if self.flow == 0 {
                    self.simple_key_allowed = true;
                }
            } else {
                return;
            }
        }
    }

    fn tag(&mut self) {
        self.c.skip();
        if self.c.is(0, b'<') {
            while !self.c.blankz() && !self.c.is(0, b'>') {
                self.c.skip();
            }
            if self.c.is(0, b'>') {
                self.c.skip();
            }
            return;
        }
        while self.c.at(0).is_some_and(is_tag_char) {
            self.c.skip();
        }
    }

    fn quoted(&mut self, quote: u8) {
        self.c.skip();
        while let Some(b) = self.c.at(0) {
            if quote == b'\'' && b == b'\'' && self.c.is(1, b'\'') {
                self.c.skip();
                self.c.skip();
            } else if b == quote {
                self.c.skip();
                return;
            } else if quote == b'"' && b == b'\\' {
                self.c.skip();
                self.c.skip();
            } else {
                self.c.skip();
            }
        }
    }

    /// A plain scalar; true if it went on over a line break (a simple key may follow).
    fn plain(&mut self) -> bool {
        let indent = self.indent() + 1;
        let mut leading_blanks = false;
        loop {
            let c = &self.c;
            if c.col == 0
                && ((c.is(0, b'-') && c.is(1, b'-') && c.is(2, b'-'))
                    || (c.is(0, b'.') && c.is(1, b'.') && c.is(2, b'.')))
                && c.blankz_at(3)
            {
                break;
            }
            if c.is(0, b'#') {
                break;
            }
            while !self.c.blankz() {
                let c = &self.c;
                if (c.is(0, b':') && c.blankz_at(1))
                    || (self.flow > 0
                        && (c.is(0, b':') && c.at(1).is_some_and(|n| b",?[]{}".contains(&n))
                            || c.at(0).is_some_and(|n| b",[]{}".contains(&n))))
                {
                    break;
                }
                self.c.skip();
            }
            if !(self.c.blank() || self.c.brk()) {
                break;
            }
            while self.c.blank() || self.c.brk() {
                if self.c.brk() {
                    leading_blanks = true;
                }
                self.c.skip();
            }
            if self.flow == 0 && (self.c.col as isize) < indent {
                break;
            }
        }
        leading_blanks
    }

    /// A literal or folded block scalar: its header, then every line indented at least as far
    /// as its content.
    fn block_scalar(&mut self) {
        self.c.skip();
        let mut increment = 0usize;
        for _ in 0..2 {
            match self.c.at(0) {
                Some(b'+' | b'-') => self.c.skip(),
                Some(d @ b'1'..=b'9') => {
                    increment = (d - b'0') as usize;
                    self.c.skip();
                }
                _ => {}
            }
        }
        while self.c.blank() {
            self.c.skip();
        }
        if self.c.is(0, b'#') {
            self.c.skip_to_line_end();
        }
        // Anything else on the header line is an error for libyaml: it stops there.
        if !self.c.brk() {
            self.c.pos = self.c.b.len();
            return;
        }
        self.c.skip();
        let parent = self.indent();
        // libyaml: an explicit indentation is relative to the parent's; none is found from the
        // first non-empty line.
        let mut indent = match increment {
            0 => 0,
            n => parent.max(0) as usize + n,
        };
        self.block_breaks(&mut indent, parent);
        while self.c.col == indent && !self.c.eof() {
            self.c.skip_to_line_end();
            if self.c.brk() {
                self.c.skip();
            }
            self.block_breaks(&mut indent, parent);
        }
    }

    /// The empty lines before (or between) a block scalar's content lines; settles the
    /// content's indentation if the header did not give it.
    fn block_breaks(&mut self, indent: &mut usize, parent: isize) {
        let mut max_indent = 0usize;
        loop {
            while (*indent == 0 || self.c.col < *indent) && self.c.is(0, b' ') {
                self.c.skip();
            }
            max_indent = max_indent.max(self.c.col);
            if (*indent == 0 || self.c.col < *indent) && self.c.is(0, b'\t') {
                // A tab where indentation is expected: libyaml stops with an error.
                self.c.pos = self.c.b.len();
                return;
            }
            if !self.c.brk() {
                break;
            }
            self.c.skip();
        }
        if *indent == 0 {
            *indent = max_indent.max((parent + 1).max(1) as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deep_json(n: usize) -> String {
        format!("{}{}", "[".repeat(n), "]".repeat(n))
    }

    #[test]
    fn json_depth_is_counted_outside_strings() {
        assert!(check_json_depth(deep_json(MAX_DEPTH).as_bytes()).is_ok());
        let e = check_json_depth(deep_json(MAX_DEPTH + 1).as_bytes()).unwrap_err();
        assert_eq!(e.code, 400);
        assert_eq!(e.message, "error decoding JSON: exceeded max depth of 100");
        // Brackets in strings neither count nor hide real ones.
        let in_strings = format!("{{\"a\": \"{}\"}}", "[".repeat(1000));
        assert!(check_json_depth(in_strings.as_bytes()).is_ok());
        let hiding = "[\"]\\\"]\"".repeat(200);
        assert!(check_json_depth(hiding.as_bytes()).is_err());
        assert!(check_json_depth(deep_json(200_000).as_bytes()).is_err());
    }

    #[test]
    fn yaml_flow_and_block_depth() {
        assert!(check_yaml_depth(deep_json(MAX_DEPTH).as_bytes()).is_ok());
        let e = check_yaml_depth(deep_json(MAX_DEPTH + 1).as_bytes()).unwrap_err();
        assert_eq!(e.message, "error decoding YAML: exceeded max depth of 100");
        assert!(check_yaml_depth("{a: ".repeat(200_000).as_bytes()).is_err());
        // Block sequences on one line, and block mappings by indentation.
        assert!(check_yaml_depth(format!("{}x\n", "- ".repeat(101)).as_bytes()).is_err());
        assert!(check_yaml_depth(format!("{}x\n", "- ".repeat(99)).as_bytes()).is_ok());
        let mut nested = String::new();
        for i in 0..120 {
            nested += &format!("{}k{i}:\n", " ".repeat(i));
        }
        assert!(check_yaml_depth(nested.as_bytes()).is_err());
        // A flow collection inside block ones counts with them.
        let mixed = format!("a:\n  b:\n    c: {}\n", deep_json(98));
        assert!(check_yaml_depth(mixed.as_bytes()).is_err());
        assert!(check_yaml_depth(&[0xFF, 0xFE, b'[', 0]).is_err());
    }

    #[test]
    fn yaml_scalars_neither_count_nor_hide_brackets() {
        let many = "[".repeat(500);
        for doc in [
            format!("a: '{many}'\n"),
            format!("a: \"{many}\"\n"),
            format!("a: x{many}\n"),
            format!("a: |\n  {many}\n  {many}\nb: 1\n"),
            format!("a: >-\n    {many}\n\n    {many}\n"),
            format!("- a: |\n    {many}\n- b\n"),
            format!("a: 1 # {many}\n"),
            format!("[a, '{many}', \"{many}\"]\n"),
            format!("a: b\n  '{many}\n"),
            format!("a: !!str '{many}'\n"),
        ] {
            assert!(check_yaml_depth(doc.as_bytes()).is_ok(), "{doc}");
        }
        // A block scalar ends where a line is indented less than its content must be: what
        // follows is structure again.
        let deep = deep_json(150);
        for doc in [
            format!("x:\n  a: |\n  b: {deep}\n"),
            format!("- a: |\n  b: {deep}\n"),
            format!("a: |\n   text\n b: {deep}\n"),
            format!("a: b\n  'c\nd: {deep} 'x'\n"),
            format!("[a'b, {deep}]\n"),
            format!("a: \"x\\\"\" {deep}\n"),
            format!("a: 'it''s' {deep}\n"),
            format!("[a: b, {deep}]\n"),
            format!("&a [{deep}]\n"),
            format!("!t,{deep}\n"),
        ] {
            assert!(check_yaml_depth(doc.as_bytes()).is_err(), "{doc}");
        }
    }

    #[test]
    fn real_manifests_pass() {
        let pod = r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web, "tier": 'front'}
  annotations:
    note: |
      [[[[ a script {{{
      with "quotes' ]]]
spec:
  containers:
  - name: web
    image: nginx
    args: ["--port", '8080', [nested, [deeper]]]
    env:
      - name: A
        value: >
          folded [ text
  - name: side
    command:
    - sh
    - -c
    - echo '[' && echo "{"
"#;
        assert!(check_yaml_depth(pod.as_bytes()).is_ok());
        let json = serde_json::json!({"a": {"b": [1, {"c": "[[[[{{"}]}});
        assert!(check_json_depth(json.to_string().as_bytes()).is_ok());
        assert!(check_yaml_depth(json.to_string().as_bytes()).is_ok());
    }

    fn value_depth(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(a) => 1 + a.iter().map(value_depth).max().unwrap_or(0),
            serde_json::Value::Object(m) => 1 + m.values().map(value_depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(3000))]
        /// Whatever libyaml (through `serde_yaml`) makes of a text, the scan finds at least half
        /// its depth (see [`check_yaml_depth`] for the two structures that nest without a
        /// level): no arrangement of quotes, comments, block scalars and indentation hides
        /// nesting from it. (Aliases are left out: they repeat what is already counted.)
        #[test]
        fn yaml_scan_never_sees_less_than_the_parser(
            doc in proptest::collection::vec(proptest::sample::select(vec![
                "[", "]", "{", "}", ",", ": ", ":", "- ", "-", "? ", "'", "''", "\"", "\\",
                "#", " #", "|", ">", "|2", "\n", "\n  ", "\n    ", " ", "\t", "a", "b: ", "&x ",
                "!t ", "!<a[b]> ", "---\n", "\r\n", "%", "x'y",
            ]), 0..60)
        ) {
            let text: String = doc.concat();
            if let Ok(v) = serde_yaml::from_str::<serde_json::Value>(&text) {
                let seen = yaml_depth(text.as_bytes(), usize::MAX).unwrap();
                proptest::prop_assert!(2 * seen >= value_depth(&v), "{text:?}: scan {seen}, parsed {}", value_depth(&v));
            }
        }

        /// The JSON scan finds exactly the depth of every JSON text.
        #[test]
        fn json_scan_matches_the_parser(
            doc in proptest::collection::vec(proptest::sample::select(vec![
                "[", "]", "{", "}", ",", ":", "\"", "\\", "\"a\"", "1", " ",
            ]), 0..60)
        ) {
            let text: String = doc.concat();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                let depth = value_depth(&v);
                proptest::prop_assert_eq!(check_json_depth(text.as_bytes()).is_ok(), depth <= MAX_DEPTH);
            }
        }
    }
}
