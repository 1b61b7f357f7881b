//! A YAML document as a tree in which every node and key carries its position.
//!
//! Parsing into this tree instead of straight into typed structs lets validation report every
//! problem of a file at once (unknown keys, wrong types, bad values), each at its own line and
//! column, where serde would stop at the first.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;
use std::fmt;

/// A position in a policy file, 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line number, starting at 1.
    pub line: u64,
    /// Column number, starting at 1.
    pub column: u64,
}

/// One YAML value with the position where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Where the value starts in the file.
    pub pos: Pos,
    /// The value itself.
    pub value: Value,
}

/// The shapes a YAML value can take.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys in file order, each with its own position.
    Map(Vec<(Key, Node)>),
}

/// A mapping key and where it is written.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

impl Value {
    /// How the value is described in "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "nothing".into(),
            Value::Bool(b) => format!("{b}"),
            Value::Int(i) => format!("{i}"),
            Value::Float(f) => crate::text::cut(&f.to_string()),
            Value::Str(s) => crate::text::quoted(s),
            Value::Seq(_) => "a list".into(),
            Value::Map(_) => "a mapping".into(),
        }
    }
}

fn pos_of(loc: &serde_saphyr::Location) -> Pos {
    Pos {
        line: loc.line(),
        column: loc.column(),
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Value>::deserialize(d)?;
        Ok(Node {
            pos: pos_of(&spanned.referenced),
            value: spanned.value,
        })
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::Float(v as f64), Value::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyString>>()? {
            let value = map.next_value::<Node>()?;
            entries.push((
                Key {
                    name: key.value.0,
                    pos: pos_of(&key.referenced),
                },
                value,
            ));
        }
        Ok(Value::Map(entries))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// A mapping key; numbers and booleans used as keys are kept as their text.
struct KeyString(String);

impl<'de> Deserialize<'de> for KeyString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Str(s) => Ok(KeyString(s)),
            Value::Int(i) => Ok(KeyString(i.to_string())),
            Value::Bool(b) => Ok(KeyString(b.to_string())),
            // YAML reads `1.10` as the number 1.1: a version written so would not be the one
            // meant.
            Value::Float(f) => Err(de::Error::custom(format!(
                "expected a plain mapping key, found the number {f}; quote it (like \"1.10\") \
                 so that it stays as written"
            ))),
            other => Err(de::Error::custom(format!(
                "expected a plain mapping key, found {}",
                other.describe()
            ))),
        }
    }
}

/// A YAML syntax error with its position, when the parser knows it.
#[derive(Debug)]
pub struct SyntaxError {
    pub pos: Option<Pos>,
    pub message: String,
}

/// Parses one YAML document into a positioned tree.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    // YAML 1.2 booleans only: `on:` (the webhook event key) must stay the text "on".
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.duplicate_keys = serde_saphyr::options::DuplicateKeyPolicy::Error;
    options.with_snippet = false;
    serde_saphyr::from_str_with_options::<Node>(text, options).map_err(|e| SyntaxError {
        pos: e.location().map(|l| pos_of(&l)),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_carry_positions() {
        let tree = parse("name: a\nstrategy:\n  steps: [1, 5]\n  interval: 30s\n").unwrap();
        let Value::Map(top) = &tree.value else {
            panic!("not a map: {tree:?}")
        };
        assert_eq!(top[0].0.name, "name");
        assert_eq!(top[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(top[0].1.pos, Pos { line: 1, column: 7 });
        let Value::Map(strategy) = &top[1].1.value else {
            panic!("strategy not a map")
        };
        assert_eq!(strategy[1].0.pos, Pos { line: 4, column: 3 });
        let Value::Seq(steps) = &strategy[0].1.value else {
            panic!("steps not a seq")
        };
        assert_eq!(steps[1].value, Value::Int(5));
        assert_eq!(
            steps[1].pos,
            Pos {
                line: 3,
                column: 14
            }
        );
    }

    #[test]
    fn yaml11_booleans_are_text() {
        let tree = parse("on: yes\nx: true\n").unwrap();
        let Value::Map(top) = &tree.value else {
            panic!("not a map")
        };
        assert_eq!(top[0].0.name, "on");
        assert_eq!(top[0].1.value, Value::Str("yes".into()));
        assert_eq!(top[1].1.value, Value::Bool(true));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.pos.map(|p| p.line), Some(2), "{err:?}");
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("a: [1, 2\nb: c\n").unwrap_err();
        assert!(err.pos.is_some(), "{err:?}");
    }
}
