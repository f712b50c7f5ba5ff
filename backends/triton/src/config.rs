//! The backend's configuration, as pure logic (tested without a server):
//! the backend configuration (`--backend-config=pipeswitch,KEY=VALUE`), a
//! model's `config.pbtxt` (as the JSON Triton hands to the backend) and its
//! check against the stored graph.

use serde_json::Value;

use pipeswitch::model::graph::Graph;
use pipeswitch::store::Dtype;

/// How a model's requests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    /// The built-in worker on the GPU, the model switched in by the
    /// residency manager (the default).
    Gpu,
    /// The library's CPU reference of the graph (`model::cpu`): slow, for
    /// checking a repository and outputs on a machine without a GPU.
    CpuReference,
}

/// `--backend-config=pipeswitch,...` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// Bytes of the device arena of each GPU.
    pub arena_bytes: u64,
    /// Bytes of the arena's workspace (for workers of other processes).
    pub workspace_bytes: u64,
    /// Bytes of the arena the residency manager places models in; the rest
    /// holds the instances' activations.
    pub residency_bytes: u64,
}

pub const DEFAULT_ARENA_BYTES: u64 = 4 << 30;

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig { arena_bytes: DEFAULT_ARENA_BYTES, workspace_bytes: 0, residency_bytes: DEFAULT_ARENA_BYTES / 4 * 3 }
    }
}

pub use pipeswitch::units::parse_size;

impl BackendConfig {
    /// From the backend configuration message Triton gives the backend:
    /// `{"cmdline": {"arena-bytes": "8G", ...}, ...}`. Unknown keys under
    /// `cmdline` are refused (a misspelt key should not pass silently), save
    /// the ones Triton adds itself.
    pub fn from_json(json: &str) -> Result<BackendConfig, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| format!("backend configuration is not JSON: {e}"))?;
        let mut c = BackendConfig::default();
        let mut residency: Option<u64> = None;
        if let Some(cmd) = v.get("cmdline").and_then(Value::as_object) {
            for (k, val) in cmd {
                let s = val.as_str().map(str::to_string).unwrap_or_else(|| val.to_string());
                match k.as_str() {
                    "arena-bytes" => c.arena_bytes = parse_size(&s).map_err(|e| format!("arena-bytes: {e}"))?,
                    "workspace-bytes" => c.workspace_bytes = parse_size(&s).map_err(|e| format!("workspace-bytes: {e}"))?,
                    "residency-bytes" => residency = Some(parse_size(&s).map_err(|e| format!("residency-bytes: {e}"))?),
                    // Added by Triton to every backend's configuration.
                    "backend-directory" | "min-compute-capability" | "default-max-batch-size" | "auto-complete-config" => {}
                    _ => {
                        return Err(format!(
                            "unknown backend configuration key {k:?} (pipeswitch takes arena-bytes, residency-bytes, workspace-bytes)"
                        ))
                    }
                }
            }
        }
        c.residency_bytes = residency.unwrap_or(c.arena_bytes / 4 * 3);
        if c.residency_bytes >= c.arena_bytes {
            return Err(format!(
                "residency-bytes ({}) must be less than arena-bytes ({}): the rest of the arena holds activations",
                c.residency_bytes, c.arena_bytes
            ));
        }
        Ok(c)
    }
}

/// Triton's name of a dtype in a model configuration.
pub fn config_type_of(d: Dtype) -> Option<&'static str> {
    Some(match d {
        Dtype::Bool => "TYPE_BOOL",
        Dtype::U8 => "TYPE_UINT8",
        Dtype::I8 => "TYPE_INT8",
        Dtype::I16 => "TYPE_INT16",
        Dtype::U16 => "TYPE_UINT16",
        Dtype::F16 => "TYPE_FP16",
        Dtype::Bf16 => "TYPE_BF16",
        Dtype::I32 => "TYPE_INT32",
        Dtype::U32 => "TYPE_UINT32",
        Dtype::F32 => "TYPE_FP32",
        Dtype::I64 => "TYPE_INT64",
        Dtype::U64 => "TYPE_UINT64",
        Dtype::F64 => "TYPE_FP64",
        Dtype::F8E4M3 | Dtype::F8E5M2 => return None,
    })
}

/// Triton's request-side name of a dtype ("FP32"): the config name without
/// its "TYPE_" prefix.
pub fn wire_type_of(d: Dtype) -> Option<&'static str> {
    config_type_of(d).map(|s| &s[5..])
}

/// One input or output of a model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct IoConfig {
    pub name: String,
    pub data_type: String,
    pub dims: Vec<i64>,
}

/// What the backend reads from a model's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The `store` parameter: the name of the store (in /dev/shm).
    pub store: String,
    /// The `model` parameter: the stored model.
    pub model: String,
    pub executor: Executor,
    pub max_batch_size: i64,
    pub inputs: Vec<IoConfig>,
    pub outputs: Vec<IoConfig>,
}

/// `max_batch_size` as both `ModelConfig::from_json` and `complete` read
/// it: an integer, or protobuf's JSON spelling of one (a string); absent is
/// 0. Anything else is refused, not taken as 0.
fn max_batch_size_of(v: &Value) -> Result<i64, String> {
    match v.get("max_batch_size") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| format!("max_batch_size {n} is not a 64-bit integer")),
        Some(Value::String(s)) => s.parse().map_err(|_| format!("max_batch_size {s:?} is not a 64-bit integer")),
        Some(x) => Err(format!("max_batch_size {x} is not an integer")),
    }
}

fn parameter(v: &Value, key: &str) -> Option<String> {
    v.get("parameters")?.get(key)?.get("string_value")?.as_str().map(str::to_string)
}

fn dims_of(v: &Value) -> Result<Vec<i64>, String> {
    let Some(a) = v.as_array() else { return Ok(Vec::new()) };
    a.iter()
        .map(|d| match d {
            Value::Number(n) => n.as_i64().ok_or_else(|| format!("dimension {n} is not an integer")),
            // Protobuf's JSON spells int64 as strings.
            Value::String(s) => s.parse().map_err(|_| format!("dimension {s:?} is not an integer")),
            _ => Err(format!("dimension {d} is not an integer")),
        })
        .collect()
}

fn ios_of(v: &Value, key: &str) -> Result<Vec<IoConfig>, String> {
    let Some(a) = v.get(key).and_then(Value::as_array) else { return Ok(Vec::new()) };
    a.iter()
        .map(|io| {
            let name = io.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
            let data_type = io.get("data_type").and_then(Value::as_str).unwrap_or("TYPE_INVALID").to_string();
            let dims = dims_of(io.get("dims").unwrap_or(&Value::Null)).map_err(|e| format!("{key} {name:?}: {e}"))?;
            Ok(IoConfig { name, data_type, dims })
        })
        .collect()
}

impl ModelConfig {
    /// From the model configuration JSON Triton gives the backend.
    pub fn from_json(json: &str) -> Result<ModelConfig, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| format!("model configuration is not JSON: {e}"))?;
        let store = parameter(&v, "store").filter(|s| !s.is_empty()).ok_or(
            "config.pbtxt names no store: add parameters { key: \"store\" value: { string_value: \"<store name>\" } }",
        )?;
        let model = parameter(&v, "model").filter(|s| !s.is_empty()).ok_or(
            "config.pbtxt names no stored model: add parameters { key: \"model\" value: { string_value: \"<model in the store>\" } }",
        )?;
        let executor = match parameter(&v, "executor").as_deref() {
            None | Some("") | Some("gpu") => Executor::Gpu,
            Some("cpu-reference") => Executor::CpuReference,
            Some(x) => return Err(format!("parameter executor is {x:?}: it takes \"gpu\" (the default) or \"cpu-reference\"")),
        };
        let max_batch_size = max_batch_size_of(&v)?;
        Ok(ModelConfig { store, model, executor, max_batch_size, inputs: ios_of(&v, "input")?, outputs: ios_of(&v, "output")? })
    }

    /// Checks the configuration against the stored graph: the same inputs
    /// and outputs, with the same types and shapes (the graph's shapes are
    /// fixed, batch included, so `max_batch_size` must be 0). The error
    /// says what differs.
    pub fn check_against(&self, graph: &Graph) -> Result<(), String> {
        let what = format!("stored model {:?} of store {:?}", self.model, self.store);
        if self.max_batch_size != 0 {
            return Err(format!(
                "max_batch_size is {}: the {what} has fixed shapes, batch included; set max_batch_size: 0 and give full dims",
                self.max_batch_size
            ));
        }
        let graph_inputs: Vec<(String, Dtype, Vec<usize>)> = graph
            .inputs
            .iter()
            .map(|(n, d)| Ok((n.clone(), d.dtype().map_err(|e| e.to_string())?, d.shape.clone())))
            .collect::<Result<_, String>>()?;
        let mut graph_outputs = Vec::new();
        for o in &graph.outputs {
            let d = graph
                .activations
                .iter()
                .chain(&graph.inputs)
                .find(|(n, _)| n == o)
                .map(|(_, d)| d)
                .ok_or_else(|| format!("the {what}'s graph declares no tensor for its output {o:?}"))?;
            graph_outputs.push((o.clone(), d.dtype().map_err(|e| e.to_string())?, d.shape.clone()));
        }
        check_list("input", &self.inputs, &graph_inputs, &what)?;
        check_list("output", &self.outputs, &graph_outputs, &what)
    }
}

/// Auto-completion: for a configuration that lists no inputs and no
/// outputs, the same configuration with the stored graph's (full shapes,
/// `max_batch_size` 0). None when there is nothing to complete.
pub fn complete(json: &str, graph: &Graph) -> Result<Option<String>, String> {
    let mut v: Value = serde_json::from_str(json).map_err(|e| format!("model configuration is not JSON: {e}"))?;
    let listed = |k: &str| v.get(k).and_then(Value::as_array).is_some_and(|a| !a.is_empty());
    if listed("input") || listed("output") {
        return Ok(None);
    }
    let decl = |name: &str| -> Result<serde_json::Value, String> {
        let d = graph
            .inputs
            .iter()
            .chain(&graph.activations)
            .find(|(n, _)| n == name)
            .map(|(_, d)| d)
            .ok_or_else(|| format!("the graph declares no tensor {name:?}"))?;
        let dtype = d.dtype().map_err(|e| e.to_string())?;
        let t = config_type_of(dtype).ok_or_else(|| format!("{name:?} is {}, which Triton has no type for", dtype.name()))?;
        Ok(serde_json::json!({"name": name, "data_type": t, "dims": d.shape}))
    };
    let inputs = graph.inputs.iter().map(|(n, _)| decl(n)).collect::<Result<Vec<_>, _>>()?;
    let outputs = graph.outputs.iter().map(|n| decl(n)).collect::<Result<Vec<_>, _>>()?;
    let batch = max_batch_size_of(&v)?;
    let obj = v.as_object_mut().ok_or("the model configuration is not a JSON object")?;
    obj.insert("input".into(), Value::Array(inputs));
    obj.insert("output".into(), Value::Array(outputs));
    if batch == 0 {
        obj.insert("max_batch_size".into(), Value::from(0));
    }
    Ok(Some(v.to_string()))
}

fn describe(list: &[(String, Dtype, Vec<usize>)]) -> String {
    list.iter()
        .map(|(n, d, s)| format!("{n} ({} {s:?})", config_type_of(*d).unwrap_or(d.name())))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_list(kind: &str, config: &[IoConfig], graph: &[(String, Dtype, Vec<usize>)], what: &str) -> Result<(), String> {
    for c in config {
        let Some((_, d, shape)) = graph.iter().find(|(n, _, _)| *n == c.name) else {
            return Err(format!("config {kind} {:?} is not an {kind} of the {what} (its {kind}s: {})", c.name, describe(graph)));
        };
        let want = config_type_of(*d).unwrap_or(d.name());
        if c.data_type != want {
            return Err(format!("{kind} {:?}: config says {}, the {what} has {want}", c.name, c.data_type));
        }
        let want_dims: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
        if c.dims != want_dims {
            return Err(format!("{kind} {:?}: config dims {:?}, the {what} has {:?}", c.name, c.dims, want_dims));
        }
    }
    for (n, d, s) in graph {
        if !config.iter().any(|c| c.name == *n) {
            return Err(format!(
                "the {what} has {kind} {n:?} ({} {s:?}), which config.pbtxt does not list",
                config_type_of(*d).unwrap_or(d.name())
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeswitch::model::cpu::tiny_models;

    fn tiny_resnet() -> Graph {
        tiny_models(2, 8).into_iter().find(|m| m.graph.name == "tiny-resnet").unwrap().graph
    }

    fn config(inputs: &str, outputs: &str, mbs: i64) -> String {
        format!(
            r#"{{"name":"m","backend":"pipeswitch","max_batch_size":{mbs},"input":[{inputs}],"output":[{outputs}],
               "parameters":{{"store":{{"string_value":"s"}},"model":{{"string_value":"tiny-resnet"}}}}}}"#
        )
    }

    fn io_json(g: &Graph) -> (String, String) {
        let (n, d) = &g.inputs[0];
        let i = format!(r#"{{"name":"{n}","data_type":"TYPE_FP32","dims":{:?}}}"#, d.shape);
        let o = &g.outputs[0];
        let od = &g.activations.iter().find(|(a, _)| a == o).unwrap().1;
        // Triton writes int64 dims as strings: both spellings are read.
        let dims: Vec<String> = od.shape.iter().map(|x| format!("\"{x}\"")).collect();
        (i, format!(r#"{{"name":"{o}","data_type":"TYPE_FP32","dims":[{}]}}"#, dims.join(",")))
    }

    #[test]
    fn a_matching_config_passes_and_each_difference_is_named() {
        let g = tiny_resnet();
        let (i, o) = io_json(&g);
        let c = ModelConfig::from_json(&config(&i, &o, 0)).unwrap();
        assert_eq!((c.store.as_str(), c.model.as_str(), c.executor), ("s", "tiny-resnet", Executor::Gpu));
        c.check_against(&g).unwrap();

        let input = &g.inputs[0].0;
        let e = ModelConfig::from_json(&config(&i.replace("TYPE_FP32", "TYPE_INT32"), &o, 0)).unwrap().check_against(&g).unwrap_err();
        assert!(e.contains(&format!("input {input:?}")) && e.contains("TYPE_INT32") && e.contains("TYPE_FP32"), "{e}");

        let wrong = i.replace(&format!("{:?}", g.inputs[0].1.shape), "[1,3,32,32]");
        let e = ModelConfig::from_json(&config(&wrong, &o, 0)).unwrap().check_against(&g).unwrap_err();
        assert!(e.contains("config dims [1, 3, 32, 32]") && e.contains("[2, 3, 32, 32]"), "{e}");

        let e = ModelConfig::from_json(&config(&i.replace(input.as_str(), "pixels"), &o, 0)).unwrap().check_against(&g).unwrap_err();
        assert!(e.contains("\"pixels\" is not an input"), "{e}");

        let e = ModelConfig::from_json(&config(&i, "", 0)).unwrap().check_against(&g).unwrap_err();
        assert!(e.contains("which config.pbtxt does not list") && e.contains(&g.outputs[0]), "{e}");

        let e = ModelConfig::from_json(&config(&i, &o, 8)).unwrap().check_against(&g).unwrap_err();
        assert!(e.contains("max_batch_size is 8"), "{e}");
    }

    #[test]
    fn completion_fills_an_empty_config_from_the_graph() {
        let g = tiny_resnet();
        let bare = config("", "", 0);
        let done = complete(&bare, &g).unwrap().expect("an empty config is completed");
        let c = ModelConfig::from_json(&done).unwrap();
        c.check_against(&g).unwrap();
        assert_eq!(c.inputs[0].name, g.inputs[0].0);
        assert_eq!(c.store, "s", "the parameters stay");
        // A config that lists anything is left to the check.
        let (i, _) = io_json(&g);
        assert_eq!(complete(&config(&i, "", 0), &g).unwrap(), None);
    }

    #[test]
    fn parameters_are_required_and_checked() {
        let e = ModelConfig::from_json(r#"{"parameters":{"model":{"string_value":"x"}}}"#).unwrap_err();
        assert!(e.contains("names no store"), "{e}");
        let e = ModelConfig::from_json(r#"{"parameters":{"store":{"string_value":"x"}}}"#).unwrap_err();
        assert!(e.contains("names no stored model"), "{e}");
        let e = ModelConfig::from_json(
            r#"{"parameters":{"store":{"string_value":"s"},"model":{"string_value":"m"},"executor":{"string_value":"tpu"}}}"#,
        )
        .unwrap_err();
        assert!(e.contains("\"tpu\""), "{e}");
        let c = ModelConfig::from_json(
            r#"{"parameters":{"store":{"string_value":"s"},"model":{"string_value":"m"},"executor":{"string_value":"cpu-reference"}}}"#,
        )
        .unwrap();
        assert_eq!(c.executor, Executor::CpuReference);
    }

    #[test]
    fn backend_config_sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("3GiB"), Ok(3 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("2X").is_err());
        let c = BackendConfig::from_json(r#"{"cmdline":{"arena-bytes":"8G","residency-bytes":"6G","backend-directory":"/x"}}"#).unwrap();
        assert_eq!(c, BackendConfig { arena_bytes: 8 << 30, workspace_bytes: 0, residency_bytes: 6 << 30 });
        let c = BackendConfig::from_json(r#"{"cmdline":{"arena-bytes":"2G"}}"#).unwrap();
        assert_eq!(c.residency_bytes, 3 << 29);
        assert_eq!(BackendConfig::from_json("{}").unwrap(), BackendConfig::default());
        let e = BackendConfig::from_json(r#"{"cmdline":{"arena-size":"8G"}}"#).unwrap_err();
        assert!(e.contains("\"arena-size\""), "{e}");
        let e = BackendConfig::from_json(r#"{"cmdline":{"arena-bytes":"1G","residency-bytes":"1G"}}"#).unwrap_err();
        assert!(e.contains("must be less than arena-bytes"), "{e}");
    }

    #[test]
    fn type_names() {
        assert_eq!(config_type_of(Dtype::F32), Some("TYPE_FP32"));
        assert_eq!(wire_type_of(Dtype::I32), Some("INT32"));
        assert_eq!(wire_type_of(Dtype::F8E4M3), None);
    }
}
