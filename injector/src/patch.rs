//! RFC 6902 JSON Patch construction with RFC 6901 pointers.
//!
//! [`PatchBuilder`] applies every operation to a working copy of the object as it is added, so
//! "does this parent exist yet?" is always answered against the object the API server will
//! patch, and a patch that would not apply is caught here (as an error) instead of becoming an
//! `InternalError` that blocks the pod in the API server.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use serde_json::{Map, Value};

/// A patch operation could not be built or would not apply.
#[derive(Debug, thiserror::Error)]
#[error("patch operation {op} {path} does not apply: {reason}")]
pub struct PatchBuildError {
    /// `add`, `remove` or `replace`.
    pub op: &'static str,
    /// The pointer.
    pub path: String,
    /// Why it failed.
    pub reason: String,
}

/// Escapes one reference token: `~` becomes `~0`, `/` becomes `~1` (in that order).
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Builds a pointer from unescaped tokens, e.g. `["metadata", "annotations", "moat.dev/x"]` to
/// `/metadata/annotations/moat.dev~1x`.
pub fn pointer<S: AsRef<str>>(tokens: &[S]) -> String {
    tokens
        .iter()
        .map(|t| format!("/{}", escape(t.as_ref())))
        .collect()
}

/// Prefixes every path of `patch` with the pointer `prefix` (e.g. `/spec/template`).
pub fn prefixed(patch: &Patch, prefix: &str) -> Result<Patch, PatchBuildError> {
    patch
        .0
        .iter()
        .map(|op| {
            let path = |p: &PointerBuf| parse(op_name(op), &format!("{prefix}{}", p.as_str()));
            Ok(match op {
                PatchOperation::Add(o) => PatchOperation::Add(AddOperation {
                    path: path(&o.path)?,
                    value: o.value.clone(),
                }),
                PatchOperation::Remove(o) => PatchOperation::Remove(RemoveOperation {
                    path: path(&o.path)?,
                }),
                PatchOperation::Replace(o) => PatchOperation::Replace(ReplaceOperation {
                    path: path(&o.path)?,
                    value: o.value.clone(),
                }),
                other => other.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Patch)
}

fn op_name(op: &PatchOperation) -> &'static str {
    match op {
        PatchOperation::Add(_) => "add",
        PatchOperation::Remove(_) => "remove",
        PatchOperation::Replace(_) => "replace",
        PatchOperation::Move(_) => "move",
        PatchOperation::Copy(_) => "copy",
        PatchOperation::Test(_) => "test",
    }
}

fn parse(op: &'static str, path: &str) -> Result<PointerBuf, PatchBuildError> {
    PointerBuf::parse(path).map_err(|e| PatchBuildError {
        op,
        path: path.to_string(),
        reason: e.to_string(),
    })
}

/// Accumulates operations against a working copy of the target object.
#[derive(Debug)]
pub struct PatchBuilder {
    work: Value,
    ops: Vec<PatchOperation>,
}

impl PatchBuilder {
    /// Starts a patch for `doc` (the object as the API server will see it).
    pub fn new(doc: Value) -> Self {
        Self {
            work: doc,
            ops: Vec::new(),
        }
    }

    /// The value at `tokens` in the working copy, if present and not null.
    pub fn get<S: AsRef<str>>(&self, tokens: &[S]) -> Option<&Value> {
        self.work.pointer(&pointer(tokens)).filter(|v| !v.is_null())
    }

    fn push(&mut self, op: PatchOperation) -> Result<(), PatchBuildError> {
        json_patch::patch(&mut self.work, std::slice::from_ref(&op)).map_err(|e| {
            PatchBuildError {
                op: op_name(&op),
                path: op.path().to_string(),
                reason: e.to_string(),
            }
        })?;
        self.ops.push(op);
        Ok(())
    }

    /// `add` at `tokens`.
    pub fn add<S: AsRef<str>>(
        &mut self,
        tokens: &[S],
        value: Value,
    ) -> Result<(), PatchBuildError> {
        let path = parse("add", &pointer(tokens))?;
        self.push(PatchOperation::Add(AddOperation { path, value }))
    }

    /// `replace` at `tokens`.
    pub fn replace<S: AsRef<str>>(
        &mut self,
        tokens: &[S],
        value: Value,
    ) -> Result<(), PatchBuildError> {
        let path = parse("replace", &pointer(tokens))?;
        self.push(PatchOperation::Replace(ReplaceOperation { path, value }))
    }

    /// `remove` at `tokens`.
    pub fn remove<S: AsRef<str>>(&mut self, tokens: &[S]) -> Result<(), PatchBuildError> {
        let path = parse("remove", &pointer(tokens))?;
        self.push(PatchOperation::Remove(RemoveOperation { path }))
    }

    /// Sets `entries` in the object at `tokens`, creating it and any missing parent objects
    /// first (a missing or null map becomes one `add` of the whole map). Existing keys not in
    /// `entries` are never touched.
    pub fn set_entries(
        &mut self,
        tokens: &[&str],
        entries: Vec<(String, Value)>,
    ) -> Result<(), PatchBuildError> {
        if entries.is_empty() {
            return Ok(());
        }
        if self.get(tokens).is_some() {
            for (k, v) in entries {
                let mut path: Vec<&str> = tokens.to_vec();
                path.push(&k);
                self.add(&path, v)?;
            }
            return Ok(());
        }
        if tokens.is_empty() {
            return Err(PatchBuildError {
                op: "add",
                path: String::new(),
                reason: "the document root is not an object".into(),
            });
        }
        // Find the deepest existing ancestor, then add one nested object below it.
        let mut depth = tokens.len();
        while depth > 0 && self.get(&tokens[..depth]).is_none() {
            depth -= 1;
        }
        let mut value = Value::Object(entries.into_iter().collect::<Map<_, _>>());
        for t in tokens[depth + 1..].iter().rev() {
            let mut m = Map::new();
            m.insert((*t).to_string(), value);
            value = Value::Object(m);
        }
        self.add(&tokens[..=depth], value)
    }

    /// Appends `items` to the array at `tokens` (creating it when missing), never replacing
    /// existing elements.
    pub fn append(&mut self, tokens: &[&str], items: Vec<Value>) -> Result<(), PatchBuildError> {
        if self.get(tokens).is_none() {
            return self.add(tokens, Value::Array(items));
        }
        for item in items {
            let mut path: Vec<&str> = tokens.to_vec();
            path.push("-");
            self.add(&path, item)?;
        }
        Ok(())
    }

    /// Inserts `items` at the front of the array at `tokens` (creating it when missing), in
    /// order, before every existing element.
    pub fn prepend(&mut self, tokens: &[&str], items: Vec<Value>) -> Result<(), PatchBuildError> {
        if self.get(tokens).is_none() {
            return self.add(tokens, Value::Array(items));
        }
        for (i, item) in items.into_iter().enumerate() {
            let index = i.to_string();
            let mut path: Vec<&str> = tokens.to_vec();
            path.push(&index);
            self.add(&path, item)?;
        }
        Ok(())
    }

    /// The patch and the patched object.
    pub fn finish(self) -> (Patch, Value) {
        (Patch(self.ops), self.work)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes_tilde_before_slash() {
        assert_eq!(escape("moat.dev/inject"), "moat.dev~1inject");
        assert_eq!(escape("a~b/c~1"), "a~0b~1c~01");
        assert_eq!(
            pointer(&["metadata", "annotations", "x/~y"]),
            "/metadata/annotations/x~1~0y"
        );
        assert_eq!(pointer::<&str>(&[]), "");
    }

    #[test]
    fn creates_missing_parents_once() {
        let mut b = PatchBuilder::new(json!({"spec": {}}));
        b.set_entries(
            &["metadata", "annotations"],
            vec![("a/b".into(), json!("1")), ("c~d".into(), json!("2"))],
        )
        .unwrap();
        b.append(&["spec", "volumes"], vec![json!({"name": "v"})])
            .unwrap();
        b.prepend(&["spec", "initContainers"], vec![json!(1), json!(2)])
            .unwrap();
        let (patch, doc) = b.finish();
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            json!([
                {"op": "add", "path": "/metadata", "value": {"annotations": {"a/b": "1", "c~d": "2"}}},
                {"op": "add", "path": "/spec/volumes", "value": [{"name": "v"}]},
                {"op": "add", "path": "/spec/initContainers", "value": [1, 2]},
            ])
        );
        assert_eq!(doc["metadata"]["annotations"]["a/b"], "1");
    }

    #[test]
    fn never_replaces_existing_arrays_or_maps() {
        let mut b = PatchBuilder::new(json!({
            "metadata": {"annotations": {"keep": "me"}, "labels": null},
            "spec": {"initContainers": [{"name": "user"}], "volumes": [{"name": "u"}]}
        }));
        b.set_entries(
            &["metadata", "annotations"],
            vec![("moat.dev/x".into(), json!("y"))],
        )
        .unwrap();
        b.set_entries(&["metadata", "labels"], vec![("l".into(), json!("v"))])
            .unwrap();
        b.prepend(
            &["spec", "initContainers"],
            vec![json!({"name": "a"}), json!({"name": "b"})],
        )
        .unwrap();
        b.append(&["spec", "volumes"], vec![json!({"name": "m"})])
            .unwrap();
        let (patch, doc) = b.finish();
        let paths: Vec<String> = patch.0.iter().map(|o| o.path().to_string()).collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations/moat.dev~1x",
                "/metadata/labels",
                "/spec/initContainers/0",
                "/spec/initContainers/1",
                "/spec/volumes/-"
            ]
        );
        assert_eq!(doc["metadata"]["annotations"]["keep"], "me");
        let names: Vec<&str> = doc["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "user"]);
    }

    #[test]
    fn reports_operations_that_would_not_apply() {
        let mut b = PatchBuilder::new(json!({"spec": {}}));
        let e = b.replace(&["spec", "missing"], json!(1)).unwrap_err();
        assert_eq!(e.op, "replace");
        assert_eq!(e.path, "/spec/missing");
        assert!(b.remove(&["nope", "deeper"]).is_err());
        assert!(b.finish().0 .0.is_empty());
    }

    #[test]
    fn prefixes_paths() {
        let mut b = PatchBuilder::new(json!({"spec": {"containers": []}}));
        b.append(&["spec", "containers"], vec![json!({"name": "x"})])
            .unwrap();
        let p = prefixed(&b.finish().0, "/spec/template").unwrap();
        assert_eq!(
            p.0[0].path().to_string(),
            "/spec/template/spec/containers/-"
        );
    }
}
