//! The backend in a real tritonserver (2.51, from the PyPI wheel
//! nvidia-pytriton 0.7.0; scripts/fetch-tritonserver.sh fetches it and
//! scripts/test.sh runs these tests with PIPESWITCH_TRITONSERVER set), on a
//! machine without a GPU: loads that must fail fail with their message
//! while the server and its other models keep serving, requests run
//! through the CPU reference executor, bad requests get HTTP 400, models
//! unload and load again through the repository API.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pipeswitch::model::cpu::{example_inputs, run_graph_cpu, HostTensor, HostWeights};
use pipeswitch::model::reference::ModelDef;
use pipeswitch::model::synthetic::add_synthetic;
use pipeswitch::model::weights::write_model_file;
use pipeswitch::store::{Dtype, Store};
use serde_json::{json, Value};

fn tritonserver() -> PathBuf {
    let p = std::env::var_os("PIPESWITCH_TRITONSERVER").map(PathBuf::from).unwrap_or_else(|| {
        panic!("set PIPESWITCH_TRITONSERVER to a tritonserver binary (scripts/fetch-tritonserver.sh prints one; scripts/test.sh sets it)")
    });
    assert!(p.is_file(), "PIPESWITCH_TRITONSERVER={} is not a file", p.display());
    p
}

/// The backend library cargo built for this test (`cargo test` leaves it
/// next to the test's binary, in target/<profile>/deps).
fn backend_lib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let lib = exe.parent().unwrap().join("libtriton_pipeswitch.so");
    assert!(lib.is_file(), "{} not built", lib.display());
    lib
}

/// A store with two tiny models that carry graphs and one that does not;
/// destroyed when dropped.
struct TestStore {
    name: String,
    defs: Vec<ModelDef>,
}

impl TestStore {
    fn new(dir: &Path) -> TestStore {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ps-triton-test-{}-{n}", std::process::id());
        let _ = Store::destroy(&name);
        let store = Store::create(&name, 64 << 20, 16).unwrap();
        let defs: Vec<ModelDef> = pipeswitch::model::cpu::tiny_models(2, 8)
            .into_iter()
            .filter(|m| m.graph.name == "tiny-resnet" || m.graph.name == "tiny-bert")
            .collect();
        for d in &defs {
            let path = dir.join(format!("{}.safetensors", d.graph.name));
            write_model_file(d, &path, 7, &mut |_, _| {}).unwrap();
            store.add_safetensors(&d.graph.name, &path, None, &mut |_, _| {}).unwrap();
        }
        let shape = vec![("l0".to_string(), vec![("l0.w".to_string(), Dtype::F32, vec![16u64, 16])])];
        add_synthetic(&store, "no-graph", &shape, 1, &mut |_, _| {}).unwrap();
        TestStore { name, defs }
    }
    fn def(&self, name: &str) -> &ModelDef {
        self.defs.iter().find(|d| d.graph.name == name).unwrap()
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let _ = Store::destroy(&self.name);
    }
}

fn wire(dtype: &str) -> &'static str {
    match dtype {
        "F32" => "TYPE_FP32",
        "I32" => "TYPE_INT32",
        d => panic!("dtype {d}"),
    }
}

/// config.pbtxt of a model whose inputs and outputs are the graph's, with
/// `edit` applied to the text.
fn config_of(name: &str, store: &str, def: &ModelDef, executor: &str, edit: &dyn Fn(String) -> String) -> String {
    let g = &def.graph;
    let mut s = format!(
        "name: \"{name}\"\nbackend: \"pipeswitch\"\nmax_batch_size: 0\nparameters {{ key: \"store\" value: {{ string_value: \"{store}\" }} }}\nparameters {{ key: \"model\" value: {{ string_value: \"{}\" }} }}\n",
        g.name
    );
    if !executor.is_empty() {
        s += &format!("parameters {{ key: \"executor\" value: {{ string_value: \"{executor}\" }} }}\n");
    }
    for (n, d) in &g.inputs {
        s += &format!("input {{ name: \"{n}\" data_type: {} dims: {:?} }}\n", wire(&d.dtype), d.shape);
    }
    for o in &g.outputs {
        let d = &g.activations.iter().find(|(a, _)| a == o).unwrap().1;
        s += &format!("output {{ name: \"{o}\" data_type: {} dims: {:?} }}\n", wire(&d.dtype), d.shape);
    }
    edit(s)
}

fn add_model(repo: &Path, name: &str, config: &str) {
    let dir = repo.join(name);
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::write(dir.join("config.pbtxt"), config).unwrap();
}

struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    fn start(repo: &Path, backends: &Path, log: PathBuf, extra: &[&str]) -> Server {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(tritonserver())
            .arg(format!("--model-repository={}", repo.display()))
            .arg(format!("--backend-directory={}", backends.display()))
            .args(["--allow-grpc=false", "--allow-metrics=false", "--exit-on-error=false", "--model-control-mode=explicit"])
            .arg(format!("--http-port={port}"))
            .args(extra)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let s = Server { child, port, log };
        let t0 = Instant::now();
        while s.get("/v2/health/live").0 != 200 {
            assert!(t0.elapsed() < Duration::from_secs(60), "tritonserver did not start:\n{}", s.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let Ok(mut c) = TcpStream::connect(("127.0.0.1", self.port)) else { return (0, Value::Null) };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        // A server still starting may accept and then reset a connection:
        // as no answer (the start-up poll asks again).
        let mut raw = Vec::new();
        if c.write_all(req.as_bytes()).is_err() || c.read_to_end(&mut raw).is_err() {
            return (0, Value::Null);
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, mut rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut decoded = String::new();
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            while let Some((len, tail)) = rest.split_once("\r\n") {
                let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
                if n == 0 {
                    break;
                }
                decoded += &tail[..n];
                rest = &tail[n + 2..];
            }
        } else {
            decoded = rest.to_string();
        }
        (status, serde_json::from_str(&decoded).unwrap_or(Value::String(decoded)))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None)
    }
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.request("POST", path, Some(body))
    }
    fn load(&self, model: &str) -> (u16, String) {
        let (s, v) = self.post(&format!("/v2/repository/models/{model}/load"), &json!({}));
        (s, v.get("error").and_then(Value::as_str).unwrap_or_default().to_string())
    }
    fn ready(&self, model: &str) -> bool {
        self.get(&format!("/v2/models/{model}/ready")).0 == 200
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend directory holding the library as Triton looks for it.
fn backend_dir(root: &Path) -> PathBuf {
    let dir = root.join("backends");
    std::fs::create_dir_all(dir.join("pipeswitch")).unwrap();
    std::fs::copy(backend_lib(), dir.join("pipeswitch/libtriton_pipeswitch.so")).unwrap();
    dir
}

fn tensor_json(name: &str, shape: &[usize], t: &HostTensor) -> Value {
    match t {
        HostTensor::F32(v) => json!({"name": name, "shape": shape, "datatype": "FP32", "data": v}),
        HostTensor::I32(v) => json!({"name": name, "shape": shape, "datatype": "INT32", "data": v}),
    }
}

fn weights_of(def: &ModelDef, seed: u64) -> HostWeights {
    pipeswitch::model::cpu::reference_weights(def, seed)
}

/// An inference request with the model's example inputs; the expected outputs.
fn request_of(def: &ModelDef) -> (Value, HashMap<String, Vec<f32>>) {
    let inputs = example_inputs(&def.graph, 3, def.vocab());
    let body = json!({
        "inputs": def.graph.inputs.iter().map(|(n, d)| tensor_json(n, &d.shape, &inputs[n])).collect::<Vec<_>>(),
    });
    let expected = run_graph_cpu(&def.graph, &weights_of(def, 7), &inputs).unwrap();
    (body, expected)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn the_backend_in_a_real_tritonserver() {
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::new(tmp.path());
    let repo = tmp.path().join("repo");
    let backends = backend_dir(tmp.path());
    let s = &store.name;
    let resnet = store.def("tiny-resnet");
    let bert = store.def("tiny-bert");
    let same = |c: String| c;
    add_model(&repo, "resnet_cpu", &config_of("resnet_cpu", s, resnet, "cpu-reference", &same));
    add_model(&repo, "bert_cpu", &config_of("bert_cpu", s, bert, "cpu-reference", &same));
    // No inputs or outputs listed: completed from the stored graph.
    let strip_io = |c: String| c.lines().filter(|l| !l.starts_with("input") && !l.starts_with("output")).collect::<Vec<_>>().join("\n");
    add_model(&repo, "bert_auto", &config_of("bert_auto", s, bert, "cpu-reference", &strip_io));
    add_model(&repo, "resnet_gpu", &config_of("resnet_gpu", s, resnet, "", &same));
    add_model(&repo, "no_store", &config_of("no_store", "ps-triton-no-such-store", resnet, "cpu-reference", &same));
    add_model(&repo, "no_model", &config_of("no_model", s, resnet, "cpu-reference", &|c| c.replace("\"tiny-resnet\"", "\"tiny-vgg\"")));
    add_model(&repo, "no_graph", &config_of("no_graph", s, resnet, "cpu-reference", &|c| c.replace("\"tiny-resnet\"", "\"no-graph\"")));
    let in0 = &resnet.graph.inputs[0];
    add_model(
        &repo,
        "bad_dims",
        &config_of("bad_dims", s, resnet, "cpu-reference", &|c| c.replace(&format!("dims: {:?}", in0.1.shape), "dims: [1, 3, 32, 32]")),
    );
    add_model(&repo, "bad_type", &config_of("bad_type", s, resnet, "cpu-reference", &|c| c.replacen("TYPE_FP32", "TYPE_FP16", 1)));
    add_model(&repo, "batched", &config_of("batched", s, resnet, "cpu-reference", &|c| c.replace("max_batch_size: 0", "max_batch_size: 4")));

    let server = Server::start(&repo, &backends, tmp.path().join("server.log"), &["--backend-config=pipeswitch,arena-bytes=1G"]);

    // Loads that must fail, each with its message; the server keeps serving.
    let expect_fail = |model: &str, needles: &[&str]| {
        let (status, msg) = server.load(model);
        assert_eq!(status, 400, "{model}: load answered {status}: {msg}\n{}", server.log_text());
        eprintln!("{model}: {msg}");
        for n in needles {
            assert!(msg.contains(n), "{model}: the load error lacks {n:?}: {msg}");
        }
        assert!(!server.ready(model), "{model} is ready after a failed load");
        assert_eq!(server.get("/v2/health/live").0, 200);
    };
    expect_fail("resnet_gpu", &["no CUDA driver found: this model needs an NVIDIA GPU"]);
    expect_fail("no_store", &["store \"ps-triton-no-such-store\" cannot be opened"]);
    expect_fail("no_model", &["has no model \"tiny-vgg\"", "tiny-resnet", "tiny-bert"]);
    expect_fail("no_graph", &["\"no-graph\" carries no graph"]);
    expect_fail("bad_dims", &[&format!("input \"{}\"", in0.0), "config dims [1, 3, 32, 32]", "[2, 3, 32, 32]"]);
    expect_fail("bad_type", &["config says TYPE_FP16", "TYPE_FP32"]);
    expect_fail("batched", &["max_batch_size is 4"]);
    let log = server.log_text();
    assert!(log.contains("pipeswitch backend: libpipeswitch") && log.contains("Triton backend API 1.19"), "no backend line in:\n{log}");
    assert!(log.contains("arena 1073741824 bytes"), "the backend configuration was not read:\n{log}");

    // Good models load and answer with the reference's outputs.
    for m in ["resnet_cpu", "bert_cpu"] {
        let (status, msg) = server.load(m);
        assert_eq!(status, 200, "{m}: {msg}\n{}", server.log_text());
        assert!(server.ready(m));
    }
    let mut successes: HashMap<&str, u64> = HashMap::new();
    let (status, msg) = server.load("bert_auto");
    assert_eq!(status, 200, "bert_auto: {msg}\n{}", server.log_text());
    let (_, v) = server.get("/v2/models/bert_auto/config");
    let names: Vec<&str> = v["input"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["input_ids", "token_type_ids"], "{v}");
    for (m, def) in [("resnet_cpu", resnet), ("bert_cpu", bert), ("resnet_cpu", resnet), ("bert_auto", bert)] {
        let (body, expected) = request_of(def);
        let (status, v) = server.post(&format!("/v2/models/{m}/infer"), &body);
        assert_eq!(status, 200, "{m}: {v}");
        let outs = v["outputs"].as_array().unwrap();
        assert_eq!(outs.len(), def.graph.outputs.len());
        for o in outs {
            let name = o["name"].as_str().unwrap();
            let got = floats(&o["data"]);
            let want = &expected[name];
            assert_eq!(got.len(), want.len(), "{m} {name}");
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{m} {name}: {g} != {w}");
            }
        }
        *successes.entry(m).or_default() += 1;
    }

    // Concurrent clients on two models (two instances executing at once).
    std::thread::scope(|sc| {
        let hs: Vec<_> = [("resnet_cpu", resnet), ("bert_cpu", bert)]
            .into_iter()
            .map(|(m, def)| {
                let server = &server;
                sc.spawn(move || {
                    let (body, expected) = request_of(def);
                    for _ in 0..4 {
                        let (status, v) = server.post(&format!("/v2/models/{m}/infer"), &body);
                        assert_eq!(status, 200, "{m}: {v}");
                        let o = &v["outputs"][0];
                        assert_eq!(floats(&o["data"]).len(), expected[o["name"].as_str().unwrap()].len());
                    }
                    m
                })
            })
            .collect();
        for h in hs {
            *successes.entry(h.join().unwrap()).or_default() += 4;
        }
    });

    // Bad requests: 400 with a message naming what is wrong; the model keeps serving.
    let (good, _) = request_of(resnet);
    let name0 = in0.0.as_str();
    let mut bad_dtype = good.clone();
    bad_dtype["inputs"][0]["datatype"] = json!("FP64");
    let mut bad_shape = good.clone();
    // (The HTTP front end itself refuses data whose length disagrees with
    // the shape: a consistent request of the wrong shape.)
    bad_shape["inputs"][0]["shape"] = json!([1, 3, 32, 32]);
    let half: Vec<Value> = good["inputs"][0]["data"].as_array().unwrap()[..3 * 32 * 32].to_vec();
    bad_shape["inputs"][0]["data"] = Value::Array(half);
    let missing = json!({"inputs": []});
    let mut extra = good.clone();
    extra["inputs"].as_array_mut().unwrap().push(json!({"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1.0]}));
    let mut bad_output = good.clone();
    bad_output["outputs"] = json!([{"name": "probabilities"}]);
    for (what, body, needle) in [
        ("wrong dtype", &bad_dtype, name0),
        ("wrong shape", &bad_shape, name0),
        ("missing input", &missing, name0),
        ("unknown input", &extra, "pixels"),
        ("unknown output", &bad_output, "probabilities"),
    ] {
        let (status, v) = server.post("/v2/models/resnet_cpu/infer", body);
        let err = v.get("error").and_then(Value::as_str).unwrap_or_default();
        assert_eq!(status, 400, "{what}: {status} {v}");
        assert!(err.contains(needle), "{what}: the error does not name {needle:?}: {err}");
        let (status, v) = server.post("/v2/models/resnet_cpu/infer", &good);
        assert_eq!(status, 200, "after {what}: {v}");
        *successes.entry("resnet_cpu").or_default() += 1;
    }

    // A request that fails inside the backend (a token id past the
    // vocabulary): its error response says why, its failure is counted, and
    // the model goes on serving.
    let (mut bad_ids, _) = request_of(bert);
    let ids = bad_ids["inputs"].as_array_mut().unwrap().iter_mut().find(|t| t["name"] == "input_ids").unwrap();
    ids["data"][0] = json!(1_000_000);
    let (status, v) = server.post("/v2/models/bert_cpu/infer", &bad_ids);
    let err = v.get("error").and_then(Value::as_str).unwrap_or_default();
    assert_eq!(status, 400, "{v}");
    assert!(err.contains("pipeswitch") && err.contains("token id outside"), "{err}");
    let (body, _) = request_of(bert);
    assert_eq!(server.post("/v2/models/bert_cpu/infer", &body).0, 200);
    *successes.entry("bert_cpu").or_default() += 1;
    let (_, v) = server.get("/v2/models/bert_cpu/stats");
    assert_eq!(v["model_stats"][0]["inference_stats"]["fail"]["count"].as_u64(), Some(1), "{v}");

    // Statistics: every successful request counted, with its times.
    for (m, n) in &successes {
        let (status, v) = server.get(&format!("/v2/models/{m}/stats"));
        assert_eq!(status, 200, "{v}");
        let st = &v["model_stats"][0];
        assert_eq!(st["inference_stats"]["success"]["count"].as_u64(), Some(*n), "{m}: {st}");
        assert_eq!(st["execution_count"].as_u64(), Some(*n), "{m}: {st}");
        assert!(st["inference_stats"]["compute_infer"]["ns"].as_u64().unwrap() > 0, "{m}: {st}");
    }

    // Explicit model control: unload, refuse, load again, serve again.
    let (status, v) = server.post("/v2/repository/models/resnet_cpu/unload", &json!({}));
    assert_eq!(status, 200, "{v}");
    let t0 = Instant::now();
    while server.ready("resnet_cpu") {
        assert!(t0.elapsed() < Duration::from_secs(20), "resnet_cpu still ready after unload");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(server.post("/v2/models/resnet_cpu/infer", &good).0, 200);
    assert!(server.ready("bert_cpu"), "unloading one model took another down");
    let (status, msg) = server.load("resnet_cpu");
    assert_eq!(status, 200, "{msg}");
    let (status, v) = server.post("/v2/models/resnet_cpu/infer", &good);
    assert_eq!(status, 200, "{v}");

    // A repository index lists every model with its state and reason.
    let (status, v) = server.post("/v2/repository/index", &json!({}));
    assert_eq!(status, 200);
    let index = v.as_array().unwrap();
    let state = |m: &str| index.iter().find(|e| e["name"] == m).map(|e| e["state"].as_str().unwrap_or("").to_string());
    assert_eq!(state("resnet_cpu").as_deref(), Some("READY"));
    assert_eq!(state("bad_dims").as_deref(), Some("UNAVAILABLE"));
}

#[test]
fn a_bad_backend_configuration_fails_the_loads_with_its_message() {
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::new(tmp.path());
    let repo = tmp.path().join("repo");
    let backends = backend_dir(tmp.path());
    let resnet = store.def("tiny-resnet");
    add_model(&repo, "resnet_cpu", &config_of("resnet_cpu", &store.name, resnet, "cpu-reference", &|c| c));
    let server = Server::start(&repo, &backends, tmp.path().join("server.log"), &["--backend-config=pipeswitch,arena-size=1G"]);
    let (status, msg) = server.load("resnet_cpu");
    assert_eq!(status, 400, "{msg}\n{}", server.log_text());
    assert!(msg.contains("unknown backend configuration key \"arena-size\""), "{msg}");
    assert_eq!(server.get("/v2/health/live").0, 200);
}
