//! Reading module paths out of what exporters leave behind: dynamo's `name_scopes` metadata,
//! TorchScript's `/a/b.0/c/Op` node names, parameter-style weight names and onnxscript's
//! `folded_from` records.

/// Metadata key where torch's dynamo exporter records a node's module scopes.
pub const NAME_SCOPES_KEY: &str = "pkg.torch.onnx.name_scopes";
/// Metadata key where torch's dynamo exporter records the classes of a node's module scopes
/// (the same list as `name_scopes`, class names instead of paths).
pub const CLASS_HIERARCHY_KEY: &str = "pkg.torch.onnx.class_hierarchy";
/// Metadata key where onnxscript's optimizer records what a folded constant came from.
pub const FOLDED_FROM_KEY: &str = "pkg.onnxscript.optimizer.folded_from";

/// The module path from a `name_scopes` value: a Python list repr of scopes from the root
/// down to the op (`['', 'model', 'model.layers.0', ..., 'model.layers.0.q_proj', 'linear']`).
/// The second-to-last entry is the module that called the op.
pub fn from_name_scopes(value: &str) -> Option<String> {
    let items = parse_py_str_list(value)?;
    if items.len() < 2 {
        return None;
    }
    let module = items[items.len() - 2].trim();
    (!module.is_empty()).then(|| module.to_string())
}

/// Parses a Python list-of-strings repr (`['a', "b"]`), honouring backslash escapes.
pub fn parse_py_str_list(value: &str) -> Option<Vec<String>> {
    let s = value.trim();
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    let mut items = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let Some(q) = chars.next() else { break };
        if q != '\'' && q != '"' {
            return None;
        }
        let mut item = String::new();
        loop {
            match chars.next()? {
                '\\' => item.push(chars.next()?),
                c if c == q => break,
                c => item.push(c),
            }
        }
        items.push(item);
    }
    Some(items)
}

/// The module path from a TorchScript-style node name `/model/layers.0/self_attn/q_proj/MatMul`:
/// scopes joined with `.`, the op part dropped. A container whose forward ran appears twice
/// (`/layer1/layer1.0/conv1/Conv` is `layer1.0.conv1`): a scope that repeats the one before
/// it as a dotted prefix replaces it.
pub fn from_node_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix('/')?;
    let mut parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    parts.pop()?; // the op (`MatMul`, `Gemm_1`, ...)
    let mut scopes: Vec<&str> = Vec::new();
    for p in parts {
        if let Some(last) = scopes.last()
            && p.len() > last.len()
            && p.starts_with(last)
            && p.as_bytes()[last.len()] == b'.'
        {
            scopes.pop();
        }
        scopes.push(p);
    }
    (!scopes.is_empty()).then(|| scopes.join("."))
}

/// The module path from a weight name that is a parameter path (`model.layers.0.q_proj.weight`,
/// or a model builder's `model.layers.0.attn.q_proj.MatMul.weight`). Anonymous exporter names
/// (`onnx::MatMul_12`, `val_3`) give nothing.
pub fn from_weight_name(name: &str) -> Option<String> {
    if name.contains("::") || name.contains('/') || !name.contains('.') {
        return None;
    }
    let stem = name.strip_suffix(".weight")?;
    let stem = ["MatMul", "Gemm", "Conv", "Gather"]
        .iter()
        .find_map(|op| stem.strip_suffix(&format!(".{op}")))
        .unwrap_or(stem);
    (!stem.is_empty()).then(|| stem.to_string())
}

/// The module path from a `folded_from` record: the first parameter path it names.
pub fn from_folded_from(value: &str) -> Option<String> {
    value
        .split(|c: char| !(c.is_alphanumeric() || c == '.' || c == '_'))
        .find_map(from_weight_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_scopes_second_to_last() {
        let v = "['', 'model', 'model.layers.0', 'model.layers.0.self_attn', 'model.layers.0.self_attn.q_proj', 'linear']";
        assert_eq!(
            from_name_scopes(v).as_deref(),
            Some("model.layers.0.self_attn.q_proj")
        );
        assert_eq!(from_name_scopes("['linear']"), None);
        assert_eq!(from_name_scopes("not a list"), None);
    }

    #[test]
    fn node_names() {
        assert_eq!(
            from_node_name("/model/layers.0/self_attn/q_proj/MatMul").as_deref(),
            Some("model.layers.0.self_attn.q_proj")
        );
        assert_eq!(
            from_node_name("/layer1/layer1.0/conv1/Conv").as_deref(),
            Some("layer1.0.conv1")
        );
        assert_eq!(from_node_name("/fc/Gemm").as_deref(), Some("fc"));
        assert_eq!(from_node_name("node_linear_3"), None);
        assert_eq!(from_node_name("/MatMul"), None);
    }

    #[test]
    fn weight_names() {
        assert_eq!(
            from_weight_name("model.layers.0.self_attn.q_proj.weight").as_deref(),
            Some("model.layers.0.self_attn.q_proj")
        );
        assert_eq!(
            from_weight_name("model.layers.0.attn.q_proj.MatMul.weight").as_deref(),
            Some("model.layers.0.attn.q_proj")
        );
        assert_eq!(from_weight_name("onnx::MatMul_123"), None);
        assert_eq!(from_weight_name("val_45"), None);
        assert_eq!(
            from_folded_from("{'model.layers.1.mlp.up_proj.weight'}").as_deref(),
            Some("model.layers.1.mlp.up_proj")
        );
    }
}
