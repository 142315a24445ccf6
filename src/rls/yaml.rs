//! Just enough YAML for rate-limit configs: a tree of scalars, sequences and
//! mappings in which every node knows its line, built from saphyr-parser's
//! events. Mapping entries keep their order and duplicates (the config layer
//! rejects those, naming both lines); anchors and aliases are resolved.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A YAML node and the line (1-based) it starts on.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Where the node starts, for error messages.
    pub line: usize,
    /// What it holds.
    pub value: Value,
}

/// The three kinds of YAML node.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A scalar's text; `plain` when it was unquoted and untagged, so that
    /// `null`, `true` or `10` may mean more than their text.
    Scalar {
        /// The scalar's text, after YAML's escapes and folding.
        text: String,
        /// Unquoted and untagged.
        plain: bool,
    },
    /// A sequence, in order.
    Seq(Vec<Node>),
    /// A mapping's entries, in order, duplicates included.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// True for an empty node: a plain `~`, `null` or nothing at all.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// A short name of the node's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Scalar { .. } if self.is_null() => "nothing",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A syntax error: its line and what is wrong.
pub type SyntaxError = (usize, String);

/// Parses the one document of `text`; `None` when the text holds none (empty
/// or comments only).
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder::default();
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| (e.marker().line(), e.info().to_string()))?;
        builder.event(event, span)?;
    }
    Ok(builder.root)
}

/// A node being built: a sequence or a mapping still open.
enum Open {
    Seq { line: usize, anchor: usize, items: Vec<Node> },
    Map { line: usize, anchor: usize, items: Vec<(Node, Node)>, key: Option<Node> },
}

/// Turns the event stream into one tree.
#[derive(Default)]
struct Builder {
    /// The nodes still open, innermost last.
    open: Vec<Open>,
    /// Finished nodes by anchor id, for aliases.
    anchors: HashMap<usize, Node>,
    /// The document, once complete.
    root: Option<Node>,
    /// Documents seen so far.
    documents: usize,
}

impl Builder {
    fn event(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let line = span.start.line();
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err((line, "more than one YAML document in the file".into()));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let plain = style == ScalarStyle::Plain && tag.is_none();
                self.close(Node { line, value: Value::Scalar { text: text.into_owned(), plain } }, anchor)?;
            }
            Event::SequenceStart(anchor, _) => self.open.push(Open::Seq { line, anchor, items: Vec::new() }),
            Event::MappingStart(anchor, _) => {
                self.open.push(Open::Map { line, anchor, items: Vec::new(), key: None });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.open.pop() {
                    Some(Open::Seq { line, anchor, items }) => (Node { line, value: Value::Seq(items) }, anchor),
                    Some(Open::Map { line, anchor, items, .. }) => (Node { line, value: Value::Map(items) }, anchor),
                    None => return Err((line, "unbalanced YAML structure".into())),
                };
                self.close(node, anchor)?;
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().ok_or((line, "alias of an unknown anchor".to_string()))?;
                self.close(node, 0)?;
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
        Ok(())
    }

    /// Hands a finished node to the node that holds it.
    fn close(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.open.last_mut() {
            Some(Open::Seq { items, .. }) => items.push(node),
            Some(Open::Map { items, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => items.push((k, node)),
            },
            None => self.root = Some(node),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(node: &Node) -> (&str, bool) {
        match &node.value {
            Value::Scalar { text, plain } => (text, *plain),
            other => panic!("not a scalar: {other:?}"),
        }
    }

    #[test]
    fn nodes_know_their_lines() {
        let text = "# a comment\ndomain: d\ndescriptors:\n  - key: k\n    value: \"v\"\n";
        let root = parse(text).unwrap().unwrap();
        let Value::Map(entries) = &root.value else { panic!("{root:?}") };
        assert_eq!(entries[0].0.line, 2);
        assert_eq!(scalar(&entries[0].1), ("d", true));
        let Value::Seq(items) = &entries[1].1.value else { panic!() };
        let Value::Map(descriptor) = &items[0].value else { panic!() };
        assert_eq!(descriptor[1].0.line, 5);
        assert_eq!(scalar(&descriptor[1].1), ("v", false));
    }

    #[test]
    fn duplicates_are_kept_and_aliases_resolved() {
        let root = parse("a: &x 1\na: 2\nb: *x\n").unwrap().unwrap();
        let Value::Map(entries) = &root.value else { panic!() };
        assert_eq!(entries.len(), 3);
        assert_eq!(scalar(&entries[2].1), ("1", true));
    }

    #[test]
    fn empty_text_is_no_document_and_errors_have_lines() {
        assert_eq!(parse("# nothing\n").unwrap(), None);
        let (line, _) = parse("a: b\nc: [d\n").unwrap_err();
        assert!(line >= 2, "{line}");
        assert!(parse("a: 1\n---\nb: 2\n").unwrap_err().1.contains("more than one"));
        assert!(parse("a: ~\n").unwrap().map(|n| matches!(n.value, Value::Map(ref e) if e[0].1.is_null())).unwrap());
    }
}
