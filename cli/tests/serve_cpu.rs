//! The daemon's control plane without a GPU: a fake GPU (records moves) and
//! fake workers (threads speaking the protocol, echoing inputs), real stores,
//! real sockets and real clients. Faults are made the way they happen: a
//! worker's socket closes mid-task (what SIGKILL does), a client leaves with
//! requests queued, peers send garbage.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pipeswitch::client::Client;
use pipeswitch::error::{Error, Result};
use pipeswitch::model::synthetic::{add_synthetic, Shape};
use pipeswitch::protocol::io::{pack_tensors, recv, send, unpack_tensors, TensorRef};
use pipeswitch::protocol::{encode_frame, Message, Role, Timing};
use pipeswitch::store::{Dtype, Store};
use pipeswitch_cli::serve::{Daemon, Gpu, ServeConfig};

const MIB: u64 = 1 << 20;

#[derive(Clone, Default)]
struct Moves(Arc<Mutex<Vec<(u64, u64, u64)>>>);

struct FakeGpu {
    moves: Moves,
}

impl Gpu for FakeGpu {
    fn device(&self) -> i32 {
        0
    }
    fn arena_handle(&self) -> Vec<u8> {
        vec![7; 128]
    }
    fn model_space(&self) -> u64 {
        64 * MIB
    }
    fn move_bytes(&mut self, from: u64, to: u64, bytes: u64) -> Result<()> {
        self.moves.0.lock().unwrap().push((from, to, bytes));
        Ok(())
    }
    fn h2d(&self) -> (f64, f64) {
        (50.0, 0.005)
    }
}

/// A test's private world: shared-memory dir, socket dir, a store.
struct World {
    _dir: tempfile::TempDir,
    sockets: PathBuf,
    store: String,
}

fn shape(mib: u64) -> Shape {
    (0..4).map(|i| (format!("l{i}"), vec![(format!("l{i}.w"), Dtype::F32, vec![mib * MIB / 16])])).collect()
}

fn world(tag: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    // Every test of this file uses the same environment value.
    static SHM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let shm = SHM.get_or_init(|| {
        let d = tempfile::tempdir().unwrap().keep();
        std::env::set_var(pipeswitch::store::shm::DIR_ENV, &d);
        d
    });
    let _ = shm;
    let store = format!("serve-{tag}-{}", std::process::id());
    let _ = Store::destroy(&store);
    let s = Store::create(&store, 16 * MIB, 16).unwrap();
    for (i, (name, mib)) in [("a", 1), ("b", 1), ("c", 1), ("big", 2), ("huge", 8)].iter().enumerate() {
        add_synthetic(&s, name, &shape(*mib), i as u64, &mut |_, _| {}).unwrap();
    }
    let sockets = dir.path().join("sock");
    World { _dir: dir, sockets, store }
}

fn config(w: &World, residency: u64) -> ServeConfig {
    ServeConfig {
        device: 0,
        store: w.store.clone(),
        socket_dir: w.sockets.clone(),
        residency_bytes: residency,
        worker_region_bytes: MIB,
        standbys: 0,
        worker_cmd: vec!["/bin/false".into()],
        max_queue: 64,
        hello_timeout: Duration::from_millis(500),
        worker_start_timeout: Duration::from_secs(10),
    }
}

/// One activation a fake worker saw: (worker id, model, resident, region offset).
type Activation = (u32, String, bool, u64);

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Activation>>>);

/// A fake worker: answers every task with its inputs as outputs; closes its
/// socket in the middle of a task for the model named in `die_on`.
fn fake_worker(socket: &Path, seen: Seen, die_on: Arc<Mutex<Option<String>>>, slow: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let s = UnixStream::connect(socket).unwrap();
    std::thread::spawn(move || {
        send(&s, &Message::Hello { role: Role::Worker, pid: std::process::id(), worker_kind: "fake".into() }, None).unwrap();
        let id = match recv(&s).unwrap() {
            Some((Message::Welcome { worker_id, arena_handle, activation_bytes, .. }, _)) => {
                assert_eq!(arena_handle, vec![7; 128]);
                assert_eq!(activation_bytes, MIB);
                worker_id
            }
            other => panic!("{other:?}"),
        };
        send(&s, &Message::Standby { worker_id: id }, None).unwrap();
        loop {
            match recv(&s) {
                Ok(Some((Message::Activate(t), file))) => {
                    seen.0.lock().unwrap().push((id, t.model.clone(), t.resident, t.region_offset));
                    if die_on.lock().unwrap().as_deref() == Some(t.model.as_str()) {
                        return; // the socket closes as if the process were killed
                    }
                    if slow.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    let ins = unpack_tensors(t.inputs, file.as_ref()).unwrap();
                    let refs: Vec<TensorRef<'_>> =
                        ins.iter().map(|(t, b)| TensorRef { name: &t.name, dtype: t.dtype, shape: &t.shape, data: b }).collect();
                    let (outputs, file) = pack_tensors(&refs).unwrap();
                    let done = Message::TaskDone { task_id: t.task_id, status: 0, message: String::new(), outputs, timing: Timing::default() };
                    use std::os::fd::AsFd;
                    send(&s, &done, file.as_ref().map(|f| f.as_fd())).unwrap();
                }
                Ok(Some((Message::Deactivate, _))) => send(&s, &Message::Standby { worker_id: id }, None).unwrap(),
                Ok(Some((Message::Shutdown, _))) | Ok(None) | Err(_) => return,
                Ok(Some((m, _))) => panic!("fake worker got {m:?}"),
            }
        }
    })
}

struct Setup {
    daemon: Option<Daemon>,
    seen: Seen,
    die_on: Arc<Mutex<Option<String>>>,
    slow: Arc<AtomicBool>,
    moves: Moves,
    socket: PathBuf,
}

fn setup(w: &World, residency: u64, workers: usize) -> Setup {
    let moves = Moves::default();
    let daemon = Daemon::start(config(w, residency), Box::new(FakeGpu { moves: moves.clone() })).unwrap();
    let socket = daemon.socket().to_path_buf();
    let (seen, die_on, slow) = (Seen::default(), Arc::new(Mutex::new(None)), Arc::new(AtomicBool::new(false)));
    for _ in 0..workers {
        fake_worker(&socket, seen.clone(), die_on.clone(), slow.clone());
    }
    Setup { daemon: Some(daemon), seen, die_on, slow, moves, socket }
}

fn client(s: &Setup) -> Client {
    Client::connect(&s.socket, Some(Duration::from_secs(10))).unwrap()
}

fn infer(c: &mut Client, model: &str, fill: u8) -> Result<()> {
    let small = vec![fill; 64];
    let large = vec![fill.wrapping_add(1); 200_000];
    let out = c.infer(
        model,
        &[
            TensorRef { name: "x", dtype: 1, shape: &[64], data: &small },
            TensorRef { name: "y", dtype: 1, shape: &[200_000], data: &large },
        ],
    )?;
    assert_eq!(out.outputs.len(), 2);
    assert_eq!(out.outputs[0].1, small, "inputs come back through the worker");
    assert_eq!(out.outputs[1].1, large, "a large tensor comes back through shared memory");
    assert!(out.timing.total_ms > 0.0);
    Ok(())
}

fn last(seen: &Seen) -> Activation {
    seen.0.lock().unwrap().last().cloned().unwrap()
}

#[test]
fn requests_switch_models_and_hit_resident_ones() {
    let w = world("basic");
    let s = setup(&w, 3 * MIB + 4096, 2);
    let mut c = client(&s);
    assert_eq!(c.store, w.store);
    infer(&mut c, "a", 1).unwrap();
    let (wa, m, resident, off_a) = last(&s.seen);
    assert_eq!((m.as_str(), resident), ("a", false), "first use: a copy");
    infer(&mut c, "a", 2).unwrap();
    assert_eq!(last(&s.seen), (wa, "a".into(), true, off_a), "same model: the active worker, no copy");
    infer(&mut c, "b", 3).unwrap();
    let (wb, m, resident, _) = last(&s.seen);
    assert!(wb != wa && m == "b" && !resident, "another model: a standby, a copy");
    infer(&mut c, "a", 4).unwrap();
    let (_, m, resident, off) = last(&s.seen);
    assert!(m == "a" && resident && off == off_a, "a stayed resident: no copy");
    infer(&mut c, "c", 5).unwrap();
    let st = c.stats().unwrap();
    assert_eq!((st.requests, st.failed), (5, 0));
    assert_eq!((st.hits, st.misses), (2, 3));
    assert_eq!(st.workers, 2);
    // Unknown model, a model larger than the residency area: clear errors,
    // and the daemon goes on serving.
    assert!(matches!(c.infer("nope", &[]), Err(Error::NotFound(_))));
    let e = c.infer("huge", &[]).unwrap_err();
    assert!(matches!(e, Error::ArenaFull(_)), "{e}");
    infer(&mut c, "b", 6).unwrap();
    s.daemon.unwrap().stop().unwrap();
}

#[test]
fn fragmented_space_is_compacted_on_the_gpu() {
    let w = world("moves");
    let s = setup(&w, 3 * MIB, 2);
    let mut c = client(&s);
    for m in ["a", "b", "c", "a", "c", "b"] {
        infer(&mut c, m, 9).unwrap();
    }
    let (_, _, _, off_b) = last(&s.seen);
    // big needs 2 MiB: a and c are evicted (least recently used), b moves.
    infer(&mut c, "big", 1).unwrap();
    let moves = s.moves.0.lock().unwrap().clone();
    assert_eq!(moves.len(), 1, "{moves:?}");
    let (from, to, bytes) = moves[0];
    assert_eq!(from, off_b);
    assert!(to < from && bytes >= MIB);
    infer(&mut c, "b", 2).unwrap();
    let (_, m, resident, off) = last(&s.seen);
    assert!(m == "b" && resident && off == to, "b is resident where it was moved");
    assert_eq!(c.stats().unwrap().evictions, 2);
}

#[test]
fn a_worker_that_dies_mid_request_fails_that_request_only() {
    let w = world("die");
    let s = setup(&w, 3 * MIB, 2);
    let mut c = client(&s);
    infer(&mut c, "a", 1).unwrap();
    *s.die_on.lock().unwrap() = Some("b".into());
    let e = c.infer("b", &[]).unwrap_err();
    assert!(matches!(e, Error::Disconnected(_)) && e.to_string().contains("died"), "{e}");
    *s.die_on.lock().unwrap() = None;
    // b was being copied when its worker died: not resident.
    infer(&mut c, "b", 2).unwrap();
    assert!(!last(&s.seen).2, "b must be copied again");
    infer(&mut c, "a", 3).unwrap();
    assert!(last(&s.seen).2, "a is still resident");
    let st = c.stats().unwrap();
    assert_eq!((st.workers_lost, st.failed), (1, 1));
}

#[test]
fn clients_that_leave_and_peers_that_send_garbage_harm_nobody() {
    let w = world("faults");
    let s = setup(&w, 3 * MIB, 2);
    s.slow.store(true, Ordering::Relaxed);
    // A client queues three requests and leaves before any result.
    {
        let raw = UnixStream::connect(&s.socket).unwrap();
        send(&raw, &Message::Hello { role: Role::Client, pid: 1, worker_kind: String::new() }, None).unwrap();
        assert!(matches!(recv(&raw).unwrap(), Some((Message::Welcome { .. }, _))));
        for (i, m) in ["a", "b", "c"].iter().enumerate() {
            send(&raw, &Message::Infer { request_id: i as u64 + 1, model: m.to_string(), inputs: vec![] }, None).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    s.slow.store(false, Ordering::Relaxed);
    // Garbage, a frame of another version, an oversized frame, no hello.
    let garbage: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        {
            let mut f = encode_frame(&Message::StatsRequest, 0).unwrap();
            f[4] = 9;
            f
        },
        {
            let mut f = encode_frame(&Message::Hello { role: Role::Client, pid: 1, worker_kind: String::new() }, 0).unwrap();
            f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
            f
        },
        encode_frame(&Message::StatsRequest, 0).unwrap(),
    ];
    for g in garbage {
        let mut raw = UnixStream::connect(&s.socket).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        raw.write_all(&g).unwrap();
        match recv(&raw) {
            Ok(Some((Message::Error { status, .. }, _))) => assert!(status == 700 || status == 702, "status {status}"),
            Ok(None) | Err(_) => {}
            Ok(Some((m, _))) => panic!("garbage got {m:?}"),
        }
        let mut rest = Vec::new();
        let _ = raw.read_to_end(&mut rest);
    }
    // A truncated frame from a client that then leaves.
    {
        let mut raw = UnixStream::connect(&s.socket).unwrap();
        let f = encode_frame(&Message::Hello { role: Role::Client, pid: 1, worker_kind: String::new() }, 0).unwrap();
        raw.write_all(&f[..7]).unwrap();
    }
    // A client may not send worker messages.
    let mut c = client(&s);
    infer(&mut c, "c", 7).unwrap();
    let st = c.stats().unwrap();
    assert!(st.requests >= 4);
}

#[test]
fn one_daemon_per_gpu_and_a_private_socket() {
    let w = world("lock");
    let s = setup(&w, 3 * MIB, 1);
    let e = match Daemon::start(config(&w, 3 * MIB), Box::new(FakeGpu { moves: Moves::default() })) {
        Err(e) => e,
        Ok(_) => panic!("a second daemon started"),
    };
    assert!(matches!(e, Error::Refused(_)) && e.to_string().contains("another pipeswitch daemon"), "{e}");
    use std::os::unix::fs::PermissionsExt;
    let dir_mode = std::fs::metadata(&w.sockets).unwrap().permissions().mode() & 0o777;
    let sock_mode = std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!((dir_mode, sock_mode), (0o700, 0o600));
    // A directory others can enter is refused.
    let open = w.sockets.parent().unwrap().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = config(&w, 3 * MIB);
    cfg.socket_dir = open;
    cfg.device = 1;
    let e = match Daemon::start(cfg, Box::new(FakeGpu { moves: Moves::default() })) {
        Err(e) => e,
        Ok(_) => panic!("a daemon started in an open directory"),
    };
    assert!(e.to_string().contains("0700"), "{e}");
    // Another user: refused even where the permissions would let it in.
    if nix::unistd::geteuid().is_root() {
        std::fs::set_permissions(w.sockets.parent().unwrap(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&w.sockets, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&s.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let hello = encode_frame(&Message::Hello { role: Role::Client, pid: 1, worker_kind: String::new() }, 0).unwrap();
        let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.sendall(bytes.fromhex(sys.argv[2]))\ns.settimeout(5)\nd=b''\nwhile True:\n  c=s.recv(65536)\n  if not c: break\n  d+=c\nprint(d.hex())";
        let hex: String = hello.iter().map(|b| format!("{b:02x}")).collect();
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new("python3")
            .args(["-c", script, s.socket.to_str().unwrap(), &hex])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let bytes: Vec<u8> = (0..text.trim().len() / 2).map(|i| u8::from_str_radix(&text.trim()[2 * i..2 * i + 2], 16).unwrap()).collect();
        let (_, msg) = pipeswitch::protocol::decode_frame(&bytes).unwrap();
        match msg {
            Message::Error { status, message, .. } => {
                assert_eq!(status, 702);
                assert!(message.contains("may not use"), "{message}");
            }
            m => panic!("another user got {m:?}"),
        }
    }
}

#[test]
fn a_restart_keeps_the_store_and_ends_old_connections_cleanly() {
    let w = world("restart");
    let s = setup(&w, 3 * MIB, 1);
    let mut c = client(&s);
    infer(&mut c, "a", 1).unwrap();
    s.daemon.unwrap().stop().unwrap();
    assert!(!s.socket.exists(), "the socket goes with the daemon");
    assert!(matches!(c.infer("a", &[]), Err(Error::Disconnected(_))));
    // The store in shared memory survived; a new daemon serves it.
    let s2 = setup(&w, 3 * MIB, 1);
    let mut c2 = client(&s2);
    infer(&mut c2, "a", 2).unwrap();
    assert!(!last(&s2.seen).2, "a new daemon starts with nothing resident");
    let models: HashMap<String, u64> = Store::open(&w.store).unwrap().models().unwrap().into_iter().map(|m| (m.name, m.bytes)).collect();
    assert_eq!(models.len(), 5);
}

#[test]
fn broken_worker_commands_back_off() {
    let w = world("backoff");
    let mut cfg = config(&w, 3 * MIB);
    cfg.standbys = 1;
    let d = Daemon::start(cfg, Box::new(FakeGpu { moves: Moves::default() })).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut c = Client::connect(d.socket(), Some(Duration::from_secs(5))).unwrap();
    let st = c.stats().unwrap();
    // /bin/false exits at once: restarts back off (0.2, 0.4, 0.8 s ...).
    assert!(st.workers_started >= 2 && st.workers_started <= 6, "{st:?}");
    assert_eq!(st.workers_lost, st.workers_started - st.workers as u64);
    d.stop().unwrap();
}
