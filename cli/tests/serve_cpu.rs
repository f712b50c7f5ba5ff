//! The daemon's control plane without a GPU: a fake GPU (records moves) and
//! fake workers (threads speaking the protocol, echoing inputs), real stores,
//! real sockets and real clients. Faults are made the way they happen: a
//! worker's socket closes mid-task (what SIGKILL does), a client leaves with
//! requests queued, peers send garbage.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pipeswitch::client::Client;
use pipeswitch::error::{Error, Result};
use pipeswitch::model::synthetic::{add_synthetic, Shape};
use pipeswitch::protocol::area::{AreaMap, Areas};
use pipeswitch::protocol::io::{pack_tensors, recv, send, TensorRef, TensorViews};
use pipeswitch::protocol::{
    encode_frame, JobState, Message, PreemptMode, Progress, Role, SaveMode, SharePolicy, StopReason, TensorData, Timing, TrainJob, TrainTask,
};
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
        single_worker: false,
        process_per_task: false,
        worker_cmd: vec!["/bin/false".into()],
        max_queue: 64,
        hello_timeout: Duration::from_millis(500),
        worker_start_timeout: Duration::from_secs(10),
        max_input_area: pipeswitch_cli::serve::DEFAULT_MAX_INPUT_AREA,
        input_areas_bytes: pipeswitch_cli::serve::DEFAULT_INPUT_AREAS_BYTES,
    }
}

/// One activation a fake worker saw: (worker id, model, resident, region offset).
type Activation = (u32, String, bool, u64);

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Activation>>>);

/// What fake workers did, in order, for the training tests: "infer <model>"
/// when an inference starts, "train <worker> <resume>" when a training task
/// starts, "preempt <iteration> <save>[ paused]" and "stopped <iteration>"
/// around a stop (a paused job is asked to write its state back).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A fake training job on a fake worker: an iteration every 2 ms; the state
/// is the iteration count, its checkpoint a file holding it (written to a
/// temporary file and renamed, as the real worker does).
struct FakeTraining {
    task_id: u64,
    job: TrainJob,
    path: String,
    iteration: u64,
    checkpoint: u64,
    running: bool,
}

/// The bytes of a fake job's state: "fake:stateN" has N MiB, others 8 bytes.
fn state_of(job: &TrainJob) -> u64 {
    job.entry.strip_prefix("fake:state").and_then(|n| n.parse::<u64>().ok()).map_or(8, |n| n * MIB)
}

fn read_checkpoint(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// One step of a fake training: Some(false) to end the worker (die_on).
fn fake_step(s: &UnixStream, t: &mut FakeTraining, die_on: &Mutex<Option<String>>) -> bool {
    t.iteration += 1;
    let mut die = die_on.lock().unwrap();
    if die.as_deref() == Some(&format!("train@{}", t.iteration)) {
        *die = None; // once
        return false; // killed in the middle of this iteration
    }
    drop(die);
    if t.job.entry == "fake:raise" && t.iteration == 3 {
        t.running = false;
        let stop = Message::TrainStopped {
            task_id: t.task_id,
            reason: StopReason::Failed,
            iteration: 2,
            checkpoint: t.checkpoint,
            status: 901,
            message: "ValueError: boom in the step".into(),
            stop_ms: 0.0,
            save_ms: 0.0,
        };
        send(s, &stop, None).unwrap();
        return true;
    }
    let progress = |t: &FakeTraining, event| Message::TrainProgress { task_id: t.task_id, event, iteration: t.iteration, checkpoint: t.checkpoint, state_bytes: state_of(&t.job) };
    send(s, &progress(t, Progress::Iteration), None).unwrap();
    if t.job.checkpoint_every > 0 && t.iteration % u64::from(t.job.checkpoint_every) == 0 {
        let tmp = format!("{}.tmp", t.path);
        std::fs::write(&tmp, t.iteration.to_string()).unwrap();
        std::fs::rename(&tmp, &t.path).unwrap();
        t.checkpoint = t.iteration;
        send(s, &progress(t, Progress::Checkpoint), None).unwrap();
    }
    if t.job.iterations > 0 && t.iteration == t.job.iterations {
        t.running = false;
        let stop = Message::TrainStopped {
            task_id: t.task_id,
            reason: StopReason::Finished,
            iteration: t.iteration,
            checkpoint: t.checkpoint,
            status: 0,
            message: String::new(),
            stop_ms: 0.0,
            save_ms: 0.0,
        };
        send(s, &stop, None).unwrap();
    }
    true
}

/// Whether `s` has a frame to read within `ms`.
fn readable(s: &UnixStream, ms: i32) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// A fake worker: answers every task with its inputs as outputs; closes its
/// socket in the middle of a task for the model named in `die_on`. It runs
/// fake training tasks too (see [`FakeTraining`]); `die_on` "train@N" kills
/// it in iteration N, "preempt" while it writes its state back.
fn fake_worker(socket: &Path, seen: Seen, die_on: Arc<Mutex<Option<String>>>, slow: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    fake_worker_logged(socket, seen, die_on, slow, Log::default())
}

fn fake_worker_logged(socket: &Path, seen: Seen, die_on: Arc<Mutex<Option<String>>>, slow: Arc<AtomicBool>, log: Log) -> std::thread::JoinHandle<()> {
    fake_worker_of_kind(socket, "fake", seen, die_on, slow, log)
}

/// A fake worker that says it is of `kind` in its hello.
fn fake_worker_of_kind(socket: &Path, kind: &str, seen: Seen, die_on: Arc<Mutex<Option<String>>>, slow: Arc<AtomicBool>, log: Log) -> std::thread::JoinHandle<()> {
    let s = UnixStream::connect(socket).unwrap();
    let kind = kind.to_string();
    std::thread::spawn(move || {
        let mut training: Option<FakeTraining> = None;
        let mut areas = Areas::default();
        send(&s, &Message::Hello { role: Role::Worker, pid: std::process::id(), worker_kind: kind }, None).unwrap();
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
            if let Some(t) = training.as_mut().filter(|t| t.running) {
                if !readable(&s, 2) {
                    if !fake_step(&s, t, &die_on) {
                        return;
                    }
                    continue;
                }
            }
            match recv(&s) {
                Ok(Some((Message::TrainStart(TrainTask { task_id, job, checkpoint_path, resume_iteration, .. }), _))) => {
                    log.push(format!("train {id} {resume_iteration} {checkpoint_path}"));
                    // Resume from the state held here, else from the file.
                    let held = training.as_ref().map(|t| t.iteration);
                    let checkpoint = training.as_ref().map_or(0, |t| t.checkpoint);
                    let from_file = read_checkpoint(&checkpoint_path);
                    let ok = resume_iteration == 0 || held == Some(resume_iteration) || from_file == Some(resume_iteration);
                    if !ok {
                        let stop = Message::TrainStopped {
                            task_id,
                            reason: StopReason::Failed,
                            iteration: 0,
                            checkpoint: 0,
                            status: 204,
                            message: format!("no saved state of iteration {resume_iteration}"),
                            stop_ms: 0.0,
                            save_ms: 0.0,
                        };
                        send(&s, &stop, None).unwrap();
                        continue;
                    }
                    let checkpoint = if held.is_some() { checkpoint } else { from_file.unwrap_or(0) };
                    let state_bytes = state_of(&job);
                    training = Some(FakeTraining { task_id, job, path: checkpoint_path, iteration: resume_iteration, checkpoint, running: true });
                    let progress = Message::TrainProgress { task_id, event: Progress::Resumed, iteration: resume_iteration, checkpoint, state_bytes };
                    send(&s, &progress, None).unwrap();
                }
                Ok(Some((Message::Preempt { task_id, save, .. }, _))) => {
                    let t = training.as_mut().expect("a preemption comes to the training worker");
                    assert_eq!(t.task_id, task_id);
                    assert_ne!(save, SaveMode::Auto, "the daemon decides");
                    log.push(format!("preempt {} {save:?}{}", t.iteration, if t.running { "" } else { " paused" }));
                    if die_on.lock().unwrap().as_deref() == Some("preempt") {
                        return; // killed while writing its state back
                    }
                    t.running = false;
                    log.push(format!("stopped {}", t.iteration));
                    let stop = Message::TrainStopped {
                        task_id,
                        reason: StopReason::Preempted,
                        iteration: t.iteration,
                        checkpoint: t.checkpoint,
                        status: 0,
                        message: String::new(),
                        stop_ms: 0.1,
                        save_ms: 0.2,
                    };
                    send(&s, &stop, None).unwrap();
                }
                Ok(Some((Message::AreaAdd { area, bytes }, file))) => {
                    log.push(format!("area+ {id} {area} {bytes}"));
                    let map = AreaMap::open(file.as_ref().expect("an area comes with its file"), bytes).unwrap();
                    assert!(areas.insert(area, map).is_none(), "area {area} added twice");
                }
                Ok(Some((Message::AreaDrop { area }, _))) => {
                    log.push(format!("area- {id} {area}"));
                    assert!(areas.remove(area).is_some(), "area {area} dropped but never added");
                }
                Ok(Some((Message::Activate(t), file))) => {
                    log.push(format!("infer {}", t.model));
                    let in_area = t.inputs.iter().filter(|t| matches!(t.data, TensorData::Area { .. })).count();
                    log.push(format!("inputs {id} {} {in_area}", t.model));
                    seen.0.lock().unwrap().push((id, t.model.clone(), t.resident, t.region_offset));
                    if die_on.lock().unwrap().as_deref() == Some(t.model.as_str()) {
                        return; // the socket closes as if the process were killed
                    }
                    if slow.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    let ins = TensorViews::with_areas(t.inputs, file.as_ref(), Some(&areas)).unwrap().into_owned();
                    let refs: Vec<TensorRef<'_>> =
                        ins.iter().map(|(t, b)| TensorRef { name: &t.name, dtype: t.dtype, shape: &t.shape, data: b }).collect();
                    let (outputs, file) = pack_tensors(&refs).unwrap();
                    let done = Message::TaskDone { task_id: t.task_id, status: 0, message: String::new(), outputs, timing: Timing::default() };
                    use std::os::fd::AsFd;
                    send(&s, &done, file.as_ref().map(|f| f.as_fd())).unwrap();
                }
                Ok(Some((Message::Deactivate, _))) => {
                    training = None;
                    send(&s, &Message::Standby { worker_id: id }, None).unwrap();
                }
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
    // Every worker is a standby before the test begins.
    let mut c = Client::connect(&socket, Some(Duration::from_secs(5))).unwrap();
    let t0 = std::time::Instant::now();
    while c.stats().unwrap().standbys < workers as u32 {
        assert!(t0.elapsed() < Duration::from_secs(10), "fake workers never became standbys");
        std::thread::sleep(Duration::from_millis(5));
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

#[test]
fn the_c_client_abi_talks_to_the_daemon() {
    use pipeswitch::ffi::client::*;
    use pipeswitch::ffi::store::ps_tensor_desc;
    use pipeswitch::ffi::{PS_ERR_NOT_FOUND, PS_ERR_NULL_ARGUMENT, PS_OK};
    use std::ffi::{CStr, CString};
    let w = world("cabi");
    let s = setup(&w, 3 * MIB, 1);
    let path = CString::new(s.socket.to_str().unwrap()).unwrap();
    let mut client: *mut ps_client = std::ptr::null_mut();
    assert_eq!(ps_client_connect(path.as_ptr(), 0, 10_000, &mut client), PS_OK);
    let name = CString::new("x").unwrap();
    let shape = [4u64, 100_000];
    let data: Vec<u8> = (0..1_600_000u32).map(|i| (i % 251) as u8).collect();
    let input = ps_tensor_desc { name: name.as_ptr(), dtype: 1, ndim: 2, shape: shape.as_ptr(), data: data.as_ptr().cast(), bytes: data.len() as u64 };
    let model = CString::new("a").unwrap();
    let mut result: *mut ps_result = std::ptr::null_mut();
    assert_eq!(ps_client_infer(client, model.as_ptr(), &input, 1, &mut result), PS_OK);
    let mut n = 0usize;
    assert_eq!(ps_result_count(result, &mut n), PS_OK);
    assert_eq!(n, 1);
    let mut v = std::mem::MaybeUninit::<ps_tensor_view>::uninit();
    assert_eq!(ps_result_tensor(result, 0, v.as_mut_ptr()), PS_OK);
    let v = unsafe { v.assume_init() };
    assert_eq!(unsafe { CStr::from_ptr(v.name) }.to_str().unwrap(), "x");
    assert_eq!((v.dtype, v.ndim, &v.shape[..2]), (1, 2, &shape[..]));
    let back = unsafe { std::slice::from_raw_parts(v.data.cast::<u8>(), v.bytes as usize) };
    assert!(back == &data[..], "the echoed tensor comes back byte for byte");
    let mut t = ps_timing::default();
    assert_eq!(ps_result_timing(result, &mut t), PS_OK);
    assert!(t.total_ms > 0.0);
    assert_eq!(ps_result_free(result), PS_OK);
    assert_ne!(ps_result_free(result), PS_OK, "a freed result is not live");
    // An input area reserved explicitly; the same bytes come back through it.
    use pipeswitch::ffi::{PS_ERR_INVALID_ARGUMENT, PS_ERR_INVALID_HANDLE};
    assert_eq!(ps_client_reserve_inputs(client, 0), PS_ERR_INVALID_ARGUMENT);
    assert_eq!(ps_client_reserve_inputs(std::ptr::null_mut(), 1 << 20), PS_ERR_NULL_ARGUMENT);
    assert_eq!(ps_client_reserve_inputs(8 as *mut ps_client, 1 << 20), PS_ERR_INVALID_HANDLE);
    assert_eq!(ps_client_reserve_inputs(client, 2 << 20), PS_OK);
    assert_eq!(ps_client_infer(client, model.as_ptr(), &input, 1, &mut result), PS_OK);
    let mut v = std::mem::MaybeUninit::<ps_tensor_view>::uninit();
    assert_eq!(ps_result_tensor(result, 0, v.as_mut_ptr()), PS_OK);
    let v = unsafe { v.assume_init() };
    assert!(unsafe { std::slice::from_raw_parts(v.data.cast::<u8>(), v.bytes as usize) } == &data[..]);
    assert_eq!(ps_result_free(result), PS_OK);
    let unknown = CString::new("nope").unwrap();
    assert_eq!(ps_client_infer(client, unknown.as_ptr(), std::ptr::null(), 0, &mut result), PS_ERR_NOT_FOUND);
    assert_eq!(ps_client_infer(client, std::ptr::null(), std::ptr::null(), 0, &mut result), PS_ERR_NULL_ARGUMENT);
    let mut st = ps_daemon_stats::default();
    assert_eq!(ps_client_get_stats(client, &mut st), PS_OK);
    assert_eq!((st.requests, st.failed, st.misses), (3, 1, 1));
    assert_eq!(ps_client_free(client), PS_OK);
}

/// A worker process for the ablation modes: the Python worker's protocol
/// loop (`pipeswitch.worker.serve`) with a backend that echoes its inputs.
const PY_ECHO_WORKER: &str = r#"
import os, socket, sys
sys.path.insert(0, sys.argv[1])
import pipeswitch.worker as W
class Echo:
    def run(self, task, inputs):
        return [(t.name, t.dtype, t.shape, b) for t, b in inputs], 0.0
    def deactivate(self):
        pass
    def close(self):
        pass
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["PIPESWITCH_SOCKET"])
W.serve(s, lambda welcome: Echo(), kind="echo")
"#;

fn ablation(tag: &str, single_worker: bool, process_per_task: bool) -> pipeswitch::protocol::Stats {
    let w = world(tag);
    let mut cfg = config(&w, 3 * MIB);
    cfg.single_worker = single_worker;
    cfg.process_per_task = process_per_task;
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../python");
    cfg.worker_cmd = vec!["python3".into(), "-c".into(), PY_ECHO_WORKER.into(), python.into()];
    let d = Daemon::start(cfg, Box::new(FakeGpu { moves: Moves::default() })).unwrap();
    let mut c = Client::connect(d.socket(), Some(Duration::from_secs(30))).unwrap();
    for (i, m) in ["a", "b", "a", "c"].iter().enumerate() {
        infer(&mut c, m, i as u8).unwrap();
    }
    let st = c.stats().unwrap();
    d.stop().unwrap();
    st
}

#[test]
fn one_worker_serves_every_model_in_the_single_worker_ablation() {
    let st = ablation("single", true, false);
    assert_eq!((st.requests, st.failed), (4, 0));
    assert_eq!((st.workers_started, st.workers_lost), (1, 0), "{st:?}");
    assert_eq!((st.hits, st.misses), (1, 3));
}

#[test]
fn a_new_process_serves_each_task_in_the_process_per_task_ablation() {
    let st = ablation("pertask", false, true);
    assert_eq!((st.requests, st.failed), (4, 0));
    assert_eq!((st.workers_started, st.workers_lost), (4, 0), "{st:?}");
    assert_eq!((st.hits, st.misses), (1, 3), "residency is the daemon's: it outlives the processes");
}

// ---------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------

fn train_job(entry: &str) -> TrainJob {
    TrainJob {
        name: "fake".into(),
        entry: entry.into(),
        preempt: PreemptMode::Abandon,
        save: SaveMode::Host,
        policy: SharePolicy::InferenceFirst,
        share: 0.5,
        period_ms: 1000,
        idle_ms: 150,
        iterations: 0,
        checkpoint_every: 0,
    }
}

struct TrainSetup {
    s: Setup,
    log: Log,
}

fn train_setup(w: &World, workers: usize) -> TrainSetup {
    let s = setup(w, 3 * MIB, 0);
    let log = Log::default();
    for _ in 0..workers {
        fake_worker_logged(&s.socket, s.seen.clone(), s.die_on.clone(), s.slow.clone(), log.clone());
    }
    wait_for(&s, "fake workers never became standbys", |c| c.stats().unwrap().standbys == workers as u32);
    TrainSetup { s, log }
}

/// Polls until `ok` holds (at most 10 s).
fn wait_for(s: &Setup, what: &str, mut ok: impl FnMut(&mut Client) -> bool) {
    let mut c = client(s);
    let t0 = std::time::Instant::now();
    while !ok(&mut c) {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}: {:?}", c.stats());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn status(s: &Setup, job: u64) -> pipeswitch::client::TrainStatus {
    client(s).train_query(job, false).unwrap()
}

#[test]
fn inference_preempts_training_at_once_and_training_resumes_after_the_idle_time() {
    let w = world("train");
    let t = train_setup(&w, 2);
    let mut c = client(&t.s);
    let st = c.train_submit(&train_job("fake:ok")).unwrap();
    assert_eq!((st.state, st.iteration), (JobState::Waiting, 0));
    let job = st.job_id;
    wait_for(&t.s, "training never ran 20 iterations", |c| c.train_query(job, false).unwrap().iteration >= 20);
    assert_eq!(c.stats().unwrap().standbys, 1, "the job holds one worker");
    infer(&mut c, "a", 1).unwrap();
    // The request ran after training had stopped, and training is paused.
    let after = status(&t.s, job);
    assert_eq!((after.state, after.preemptions), (JobState::Paused, 1), "{after:?}");
    let lines = t.log.lines();
    let at = |p: &str| lines.iter().position(|l| l.starts_with(p)).unwrap_or_else(|| panic!("no {p:?} in {lines:?}"));
    assert!(at("preempt") < at("stopped") && at("stopped") < at("infer a"), "{lines:?}");
    let stopped: u64 = lines[at("stopped")].split(' ').nth(1).unwrap().parse().unwrap();
    assert_eq!(after.iteration, stopped, "the daemon knows the iteration the state was saved at");
    // Requests closer together than the idle time keep training paused.
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(30));
        infer(&mut c, "a", i).unwrap();
        assert_eq!(status(&t.s, job).state, JobState::Paused);
    }
    // Idle for 150 ms: training resumes on the worker holding its state,
    // from the iteration it stopped at.
    wait_for(&t.s, "training never resumed", |c| c.train_query(job, false).unwrap().iteration > stopped + 5);
    let lines = t.log.lines();
    let starts: Vec<&String> = lines.iter().filter(|l| l.starts_with("train")).collect();
    assert_eq!(starts.len(), 2, "{lines:?}");
    let (w1, w2) = (starts[0].split(' ').nth(1), starts[1].split(' ').nth(1));
    assert_eq!(w1, w2, "the same worker resumes: {lines:?}");
    assert_eq!(starts[1].split(' ').nth(2).unwrap(), stopped.to_string(), "{lines:?}");
    // Cancel: the job ends, its worker goes back to standby.
    assert_eq!(c.train_query(job, true).unwrap().job_id, job);
    wait_for(&t.s, "the cancelled job's worker never came back", |c| {
        c.train_query(job, false).unwrap().state == JobState::Cancelled && c.stats().unwrap().standbys == 1
    });
    // One job at a time; bad jobs are refused clearly.
    let e = c.train_submit(&TrainJob { entry: "nocolon".into(), ..train_job("x") }).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    let j2 = c.train_submit(&train_job("fake:ok")).unwrap().job_id;
    let e = c.train_submit(&train_job("fake:ok")).unwrap_err();
    assert!(matches!(e, Error::Refused(_)) && e.to_string().contains("one job at a time"), "{e}");
    assert!(matches!(c.train_query(999, false), Err(Error::NotFound(_))));
    c.train_query(j2, true).unwrap();
    t.s.daemon.unwrap().stop().unwrap();
}

#[test]
fn a_training_worker_killed_mid_iteration_resumes_from_its_checkpoint() {
    let w = world("trainkill");
    let t = train_setup(&w, 2);
    let mut c = client(&t.s);
    *t.s.die_on.lock().unwrap() = Some("train@13".into());
    let job = c.train_submit(&TrainJob { checkpoint_every: 5, iterations: 40, ..train_job("fake:ok") }).unwrap().job_id;
    wait_for(&t.s, "the job never finished", |c| c.train_query(job, false).unwrap().state == JobState::Finished);
    let st = status(&t.s, job);
    assert_eq!((st.iteration, st.status), (40, 0), "{st:?}");
    let lines = t.log.lines();
    let starts: Vec<&String> = lines.iter().filter(|l| l.starts_with("train")).collect();
    assert_eq!(starts.len(), 2, "{lines:?}");
    assert_eq!(starts[1].split(' ').nth(2).unwrap(), "10", "resumed from the checkpoint of iteration 10: {lines:?}");
    let stats = c.stats().unwrap();
    assert_eq!(stats.workers_lost, 1);
    // The finished job's checkpoint file is gone.
    let dir = std::env::var_os(pipeswitch::store::shm::DIR_ENV).unwrap();
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with(&format!("pipeswitch-train-{}-", std::process::id()))).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_job_cancelled_while_waiting_for_a_worker_removes_its_checkpoint() {
    // One worker, killed after a checkpoint: the job waits (no standby to
    // resume on) with its checkpoint file; cancelling it there must remove
    // the file, as every other end of a job does.
    let w = world("traincancelwait");
    let t = train_setup(&w, 1);
    let mut c = client(&t.s);
    *t.s.die_on.lock().unwrap() = Some("train@13".into());
    let job = c.train_submit(&TrainJob { checkpoint_every: 5, ..train_job("fake:ok") }).unwrap().job_id;
    wait_for(&t.s, "the job never lost its worker", |c| {
        let st = c.train_query(job, false).unwrap();
        st.state == JobState::Waiting && st.checkpoint == 10
    });
    let lines = t.log.lines();
    let path = lines.iter().find(|l| l.starts_with("train")).and_then(|l| l.split(' ').nth(3)).unwrap_or_else(|| panic!("{lines:?}")).to_string();
    assert_eq!(read_checkpoint(&path), Some(10), "the checkpoint file of iteration 10");
    let st = c.train_query(job, true).unwrap();
    assert_eq!(st.state, JobState::Cancelled, "{st:?}");
    assert!(!Path::new(&path).exists(), "the cancelled job's checkpoint {path} is left in shared memory");
    t.s.daemon.unwrap().stop().unwrap();
}

#[test]
fn a_training_worker_killed_without_a_checkpoint_fails_the_job_clearly() {
    let w = world("trainnock");
    let t = train_setup(&w, 2);
    let mut c = client(&t.s);
    *t.s.die_on.lock().unwrap() = Some("train@7".into());
    let job = c.train_submit(&train_job("fake:ok")).unwrap().job_id;
    wait_for(&t.s, "the job never failed", |c| c.train_query(job, false).unwrap().state == JobState::Failed);
    let st = status(&t.s, job);
    assert!(st.message.contains("died") && st.message.contains("no checkpoint"), "{st:?}");
    assert_eq!(st.status, 701, "disconnected");
    // The daemon goes on serving inference.
    infer(&mut c, "a", 1).unwrap();
}

#[test]
fn a_preemption_while_the_state_is_written_back_resumes_from_the_checkpoint() {
    let w = world("trainwb");
    let t = train_setup(&w, 3);
    let mut c = client(&t.s);
    let job = c.train_submit(&TrainJob { checkpoint_every: 4, ..train_job("fake:ok") }).unwrap().job_id;
    wait_for(&t.s, "no checkpoint", |c| c.train_query(job, false).unwrap().checkpoint >= 8);
    *t.s.die_on.lock().unwrap() = Some("preempt".into());
    // The worker dies while it saves: the request is served all the same.
    infer(&mut c, "a", 1).unwrap();
    *t.s.die_on.lock().unwrap() = None;
    let st = status(&t.s, job);
    assert!(matches!(st.state, JobState::Waiting | JobState::Running), "{st:?}");
    assert_eq!(st.iteration, st.checkpoint, "back to its checkpoint: {st:?}");
    let resumed_from = st.checkpoint;
    wait_for(&t.s, "training never resumed", |c| c.train_query(job, false).unwrap().iteration > resumed_from + 3);
    let lines = t.log.lines();
    let last_start = lines.iter().rev().find(|l| l.starts_with("train")).unwrap();
    assert_eq!(last_start.split(' ').nth(2).unwrap(), resumed_from.to_string(), "{lines:?}");
    assert_eq!(c.stats().unwrap().workers_lost, 1);
}

#[test]
fn a_training_job_that_raises_fails_with_its_message_and_frees_its_worker() {
    let w = world("trainraise");
    let t = train_setup(&w, 2);
    let mut c = client(&t.s);
    let job = c.train_submit(&train_job("fake:raise")).unwrap().job_id;
    wait_for(&t.s, "the job never failed", |c| c.train_query(job, false).unwrap().state == JobState::Failed);
    let st = status(&t.s, job);
    assert_eq!((st.status, st.iteration), (901, 2), "{st:?}");
    assert!(st.message.contains("ValueError: boom"), "{st:?}");
    wait_for(&t.s, "the worker never came back", |c| c.stats().unwrap().standbys == 2);
    assert_eq!(c.stats().unwrap().workers_lost, 0);
    infer(&mut c, "b", 3).unwrap();
}

/// The Python worker's training loop (`pipeswitch.worker.serve`) under the
/// real daemon: the plain-Python job of python/tests/test_train.py (floats,
/// its steps wait 2 ms for a preemption), an echo for inference.
const PY_TRAIN_WORKER: &str = r#"
import os, socket, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import pipeswitch.worker as W
from test_train import PlainBackend
class Both(PlainBackend):
    def run(self, task, inputs):
        return [(t.name, t.dtype, t.shape, b) for t, b in inputs], 0.0
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["PIPESWITCH_SOCKET"])
W.serve(s, Both, kind="plain")
"#;

#[test]
fn python_workers_train_pause_for_inference_and_resume() {
    let w = world("pytrain");
    let mut cfg = config(&w, 3 * MIB);
    cfg.standbys = 2;
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../python");
    cfg.worker_cmd = vec!["python3".into(), "-c".into(), PY_TRAIN_WORKER.into(), python.into()];
    let d = Daemon::start(cfg, Box::new(FakeGpu { moves: Moves::default() })).unwrap();
    let mut c = Client::connect(d.socket(), Some(Duration::from_secs(30))).unwrap();
    let job = c.train_submit(&TrainJob { entry: "plain:job".into(), idle_ms: 200, ..train_job("") }).unwrap().job_id;
    let t0 = std::time::Instant::now();
    let wait = |c: &mut Client, what: &str, ok: &dyn Fn(&pipeswitch::client::TrainStatus) -> bool| loop {
        let st = c.train_query(job, false).unwrap();
        if ok(&st) {
            return st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{what}: {st:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    wait(&mut c, "training never ran", &|st| st.iteration >= 20);
    infer(&mut c, "a", 1).unwrap();
    let paused = c.train_query(job, false).unwrap();
    assert_eq!((paused.state, paused.preemptions), (JobState::Paused, 1), "{paused:?}");
    // The Python worker answered the preemption: it holds iteration N, and
    // resumes from it once the queue has been idle.
    let st = wait(&mut c, "training never resumed", &|st| st.state == JobState::Running && st.iteration > paused.iteration);
    assert!(st.iteration > paused.iteration && st.preemptions == 1, "{st:?}");
    c.train_query(job, true).unwrap();
    wait(&mut c, "never cancelled", &|st| st.state == JobState::Cancelled);
    let stats = c.stats().unwrap();
    assert_eq!((stats.workers_lost, stats.failed), (0, 0), "{stats:?}");
    d.stop().unwrap();
}

#[test]
fn python_workers_write_back_a_paused_resident_state_when_a_model_needs_its_room() {
    let w = world("pyauto");
    let mut cfg = config(&w, 3 * MIB);
    cfg.standbys = 2;
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../python");
    cfg.worker_cmd = vec!["python3".into(), "-c".into(), PY_TRAIN_WORKER.into(), python.into()];
    let d = Daemon::start(cfg, Box::new(FakeGpu { moves: Moves::default() })).unwrap();
    let mut c = Client::connect(d.socket(), Some(Duration::from_secs(30))).unwrap();
    // The Python job reports 2 MiB of state: accounted in the 3 MiB area.
    let name = format!("plain state={}", 2 * MIB);
    let job = TrainJob { name, entry: "plain:job".into(), idle_ms: 300, save: SaveMode::Auto, ..train_job("") };
    let job = c.train_submit(&job).unwrap().job_id;
    let t0 = std::time::Instant::now();
    let wait = |c: &mut Client, what: &str, ok: &dyn Fn(&pipeswitch::client::TrainStatus) -> bool| loop {
        let st = c.train_query(job, false).unwrap();
        if ok(&st) {
            return st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{what}: {st:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    wait(&mut c, "training never ran", &|st| st.iteration >= 20);
    // "a" (1 MiB) fits beside the state: paused resident.
    infer(&mut c, "a", 1).unwrap();
    assert_eq!(c.train_query(job, false).unwrap().state, JobState::Paused);
    // "big" (2 MiB) does not: the worker writes the paused state back first
    // (else the request would fail: the area would be full).
    infer(&mut c, "big", 2).unwrap();
    let paused = c.train_query(job, false).unwrap();
    assert_eq!((paused.state, paused.preemptions), (JobState::Paused, 1), "{paused:?}");
    let st = wait(&mut c, "training never resumed", &|st| st.state == JobState::Running && st.iteration > paused.iteration);
    assert_eq!(st.preemptions, 1);
    c.train_query(job, true).unwrap();
    wait(&mut c, "never cancelled", &|st| st.state == JobState::Cancelled);
    let stats = c.stats().unwrap();
    assert_eq!((stats.workers_lost, stats.failed), (0, 0), "{stats:?}");
    d.stop().unwrap();
}

#[test]
fn time_share_alternates_training_and_inference_under_steady_load() {
    let w = world("trainshare");
    let t = train_setup(&w, 2);
    let mut c = client(&t.s);
    let job = TrainJob { policy: SharePolicy::TimeShare, share: 0.5, period_ms: 300, ..train_job("fake:ok") };
    let id = c.train_submit(&job).unwrap().job_id;
    wait_for(&t.s, "training never ran", |c| c.train_query(id, false).unwrap().iteration >= 5);
    // Requests back to back for 1.5 s: inference never lets the queue go
    // idle, yet training gets its turns, and no request waits much longer
    // than training's turn (150 ms).
    let start = std::time::Instant::now();
    let mut worst = Duration::ZERO;
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        let t0 = std::time::Instant::now();
        infer(&mut c, "a", n as u8).unwrap();
        worst = worst.max(t0.elapsed());
        n += 1;
    }
    let st = c.train_query(id, false).unwrap();
    let resumes = t.log.lines().iter().filter(|l| l.starts_with("train")).count() - 1;
    assert!(st.preemptions >= 3 && resumes >= 3, "training had too few turns: {st:?}, {resumes} resumes");
    assert!(n >= 10, "inference had too few turns: {n} requests");
    assert!(worst < Duration::from_millis(150 + 250), "a request waited {worst:?}");
    assert!(worst > Duration::from_millis(100), "requests never waited for training's turn: {worst:?}");
    c.train_query(id, true).unwrap();
}

/// When the arena has no room for another worker region (two standbys,
/// the training job's worker and the active inference worker need four,
/// the arena holds three), the daemon starts no process it cannot give a
/// region, and retries with a back-off instead of at every tick (on the
/// H100 it once started thousands of processes a minute).
#[test]
fn no_worker_process_starts_without_room_for_its_region() {
    let w = world("noroom");
    let started = w.sockets.parent().unwrap().join(format!("started-{}", std::process::id()));
    let _ = std::fs::remove_file(&started);
    let mut cfg = config(&w, 61 * MIB);
    cfg.standbys = 2;
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../python");
    // The Python training worker, recording each start.
    cfg.worker_cmd = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("echo x >> '{}'; exec python3 -c \"$0\" \"$1\"", started.display()).into(),
        PY_TRAIN_WORKER.into(),
        python.into(),
    ];
    let d = Daemon::start(cfg, Box::new(FakeGpu { moves: Moves::default() })).unwrap();
    let spawned = || std::fs::read_to_string(&started).map(|t| t.lines().count()).unwrap_or(0);
    let mut c = Client::connect(d.socket(), Some(Duration::from_secs(30))).unwrap();
    let job = c.train_submit(&TrainJob { entry: "plain:job".into(), idle_ms: 200, ..train_job("") }).unwrap().job_id;
    let t0 = std::time::Instant::now();
    while c.train_query(job, false).unwrap().iteration < 5 {
        assert!(t0.elapsed() < Duration::from_secs(30), "training never ran: {:?} {:?}", c.stats(), c.train_query(job, false));
        std::thread::sleep(Duration::from_millis(5));
    }
    infer(&mut c, "a", 1).unwrap();
    // Training (paused) and the inference worker hold two regions, one
    // standby the third: the daemon wants a second standby and has no room.
    std::thread::sleep(Duration::from_millis(1500));
    let n = spawned();
    assert_eq!(n, 3, "{n} worker processes started for three regions");
    c.train_query(job, true).unwrap();
    d.stop().unwrap();
    let _ = std::fs::remove_file(&started);
}

/// The log lines of preemptions: (save mode, whether the job was paused).
fn preempts(log: &Log) -> Vec<(String, bool)> {
    log.lines()
        .iter()
        .filter_map(|l| l.strip_prefix("preempt "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[1].to_string(), f.get(2) == Some(&"paused"))
        })
        .collect()
}

#[test]
fn auto_keeps_the_state_resident_while_there_is_room_and_writes_it_back_for_a_model_that_needs_it() {
    let w = world("auto");
    let t = train_setup(&w, 2); // 3 MiB of residency
    let mut c = client(&t.s);
    for m in ["a", "b", "c"] {
        infer(&mut c, m, 1).unwrap();
    }
    let before = c.stats().unwrap();
    assert_eq!((before.misses, before.evictions), (3, 0));
    // A state of 2 MiB: accounted when the job starts; the two least
    // recently used models go ("c" has the room left).
    let job = c.train_submit(&TrainJob { save: SaveMode::Auto, ..train_job("fake:state2") }).unwrap().job_id;
    wait_for(&t.s, "training never ran 10 iterations", |c| c.train_query(job, false).unwrap().iteration >= 10);
    let st = c.stats().unwrap();
    assert_eq!((st.misses, st.evictions), (3, 2), "the state evicted a and b, and is no miss: {st:?}");
    infer(&mut c, "c", 2).unwrap();
    let (_, m, resident, _) = last(&t.s.seen);
    assert!(m == "c" && resident, "c was not evicted: the state took only what it needed");
    // "a" (1 MiB) fits beside the state (c goes): the state stays resident.
    infer(&mut c, "a", 2).unwrap();
    assert_eq!(preempts(&t.log), vec![("Resident".to_string(), false)]);
    assert_eq!(c.stats().unwrap().evictions, 3);
    assert_eq!(status(&t.s, job).state, JobState::Paused);
    // "big" (2 MiB) needs the room the paused state holds: written back first.
    infer(&mut c, "big", 3).unwrap();
    assert_eq!(preempts(&t.log), vec![("Resident".to_string(), false), ("Host".to_string(), true)]);
    let lines = t.log.lines();
    let at = |p: &str| lines.iter().rposition(|l| l.starts_with(p)).unwrap_or_else(|| panic!("no {p:?} in {lines:?}"));
    assert!(at("preempt") < at("stopped") && at("stopped") < at("infer big"), "{lines:?}");
    let st = status(&t.s, job);
    assert_eq!((st.state, st.preemptions), (JobState::Paused, 1), "a write-back is no new preemption: {st:?}");
    // Idle: training resumes, its state accounted again ("big"'s idle
    // worker steps down; a and big go).
    let stopped = st.iteration;
    wait_for(&t.s, "training never resumed", |c| c.train_query(job, false).unwrap().iteration > stopped + 5);
    wait_for(&t.s, "the resumed state was never accounted", |c| c.stats().unwrap().evictions == 5);
    // Running, and a request whose model needs the state's room: written back.
    infer(&mut c, "big", 4).unwrap();
    assert_eq!(preempts(&t.log).last(), Some(&("Host".to_string(), false)), "{:?}", t.log.lines());
    // Back on the GPU after the idle time; then "a" fits beside it again.
    let stopped = status(&t.s, job).iteration;
    wait_for(&t.s, "training never resumed", |c| c.train_query(job, false).unwrap().iteration > stopped + 5);
    infer(&mut c, "a", 5).unwrap();
    assert_eq!(preempts(&t.log).last(), Some(&("Resident".to_string(), false)), "{:?}", t.log.lines());
    c.train_query(job, true).unwrap();
    t.s.daemon.unwrap().stop().unwrap();
}

#[test]
fn auto_writes_the_state_back_when_the_residency_area_is_too_small_for_it() {
    let w = world("autosmall");
    let t = train_setup(&w, 2);
    let mut c = client(&t.s);
    // 4 MiB of state, 3 MiB of residency: never accounted, always written back.
    let job = c.train_submit(&TrainJob { save: SaveMode::Auto, ..train_job("fake:state4") }).unwrap().job_id;
    wait_for(&t.s, "training never ran 10 iterations", |c| c.train_query(job, false).unwrap().iteration >= 10);
    infer(&mut c, "a", 1).unwrap();
    assert_eq!(preempts(&t.log), vec![("Host".to_string(), false)]);
    assert_eq!(c.stats().unwrap().evictions, 0);
    // Explicit modes are kept as they are: resident even where auto would not.
    c.train_query(job, true).unwrap();
    wait_for(&t.s, "the job never ended", |c| c.train_query(job, false).unwrap().state == JobState::Cancelled);
    let job = c.train_submit(&TrainJob { save: SaveMode::Resident, ..train_job("fake:state4") }).unwrap().job_id;
    let n = preempts(&t.log).len();
    wait_for(&t.s, "training never ran 10 iterations", |c| c.train_query(job, false).unwrap().iteration >= 10);
    infer(&mut c, "b", 2).unwrap();
    assert_eq!(preempts(&t.log)[n..], [("Resident".to_string(), false)]);
    c.train_query(job, true).unwrap();
    t.s.daemon.unwrap().stop().unwrap();
}

#[test]
fn the_state_accounting_is_released_on_cancel_and_when_the_worker_dies() {
    let w = world("autorel");
    let t = train_setup(&w, 2);
    let mut c = client(&t.s);
    // Paused with its 2 MiB resident, then cancelled: "big" (2 MiB) fits
    // beside "a" only if the reservation went with the job.
    let job = c.train_submit(&TrainJob { save: SaveMode::Auto, ..train_job("fake:state2") }).unwrap().job_id;
    wait_for(&t.s, "training never ran 10 iterations", |c| c.train_query(job, false).unwrap().iteration >= 10);
    infer(&mut c, "a", 1).unwrap();
    assert_eq!(preempts(&t.log), vec![("Resident".to_string(), false)]);
    assert_eq!(c.train_query(job, true).unwrap().state, JobState::Cancelled);
    infer(&mut c, "big", 2).unwrap();
    infer(&mut c, "a", 3).unwrap();
    let (_, m, resident, _) = last(&t.s.seen);
    assert!(m == "a" && resident, "a and big are resident together");
    // A job whose worker dies in iteration 8 (no checkpoint: it fails).
    *t.s.die_on.lock().unwrap() = Some("train@8".into());
    let job = c.train_submit(&TrainJob { save: SaveMode::Auto, ..train_job("fake:state2") }).unwrap().job_id;
    wait_for(&t.s, "the job never failed", |c| c.train_query(job, false).unwrap().state == JobState::Failed);
    infer(&mut c, "big", 4).unwrap();
    infer(&mut c, "a", 5).unwrap();
    let (_, m, resident, _) = last(&t.s.seen);
    assert!(m == "a" && resident, "the dead worker's state no longer takes room");
    t.s.daemon.unwrap().stop().unwrap();
}

/// Training runs only on workers that can train: a daemon whose workers are
/// all the built-in PTX worker refuses a job with a message that says how to
/// start one that can; beside a worker that can, the job runs there, never
/// on the built-in one.
#[test]
fn training_jobs_go_to_workers_that_can_train() {
    let w = world("trainkind");
    let s = setup(&w, 3 * MIB, 0);
    let log = Log::default();
    fake_worker_of_kind(&s.socket, "builtin", s.seen.clone(), s.die_on.clone(), s.slow.clone(), log.clone());
    wait_for(&s, "the built-in worker never became a standby", |c| c.stats().unwrap().standbys == 1);
    let mut c = client(&s);
    let e = c.train_submit(&train_job("fake:ok")).unwrap_err();
    assert!(matches!(e, Error::Refused(_)) && e.to_string().contains("--worker-cmd"), "{e}");
    // A worker that can train joins: the job runs on it.
    fake_worker_of_kind(&s.socket, "torch", s.seen.clone(), s.die_on.clone(), s.slow.clone(), log.clone());
    wait_for(&s, "the second worker never became a standby", |c| c.stats().unwrap().standbys == 2);
    let job = c.train_submit(&train_job("fake:ok")).unwrap().job_id;
    wait_for(&s, "training never ran", |c| c.train_query(job, false).unwrap().iteration >= 5);
    let lines = log.lines();
    let starts: Vec<&String> = lines.iter().filter(|l| l.starts_with("train")).collect();
    assert_eq!(starts.len(), 1, "{lines:?}");
    // Worker ids are given in the order the workers joined: 1 built-in, 2 torch.
    assert_eq!(starts[0].split(' ').nth(1), Some("2"), "training ran on the built-in worker: {lines:?}");
    c.train_query(job, true).unwrap();
    s.daemon.unwrap().stop().unwrap();
}

/// A daemon removes, when it starts, the training checkpoints that killed
/// daemons of its GPU left behind (their pid is gone), and no others.
#[test]
fn a_starting_daemon_sweeps_checkpoints_of_daemons_that_are_gone() {
    let w = world("sweep");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let path = |name: String| pipeswitch::store::shm::path_of(&name).unwrap();
    let stale = path(format!("train-{dead}-7-gpu0-1"));
    let live = path(format!("train-{}-7-gpu0-1", std::process::id()));
    let other_gpu = path(format!("train-{dead}-7-gpu3-1"));
    for p in [&stale, &live, &other_gpu] {
        std::fs::write(p, b"checkpoint").unwrap();
    }
    let d = Daemon::start(config(&w, 3 * MIB), Box::new(FakeGpu { moves: Moves::default() })).unwrap();
    let (s, l, o) = (stale.exists(), live.exists(), other_gpu.exists());
    for p in [&stale, &live, &other_gpu] {
        let _ = std::fs::remove_file(p);
    }
    d.stop().unwrap();
    assert!(!s, "the dead daemon's checkpoint was left");
    assert!(l, "a running daemon's checkpoint was removed");
    assert!(o, "another GPU's checkpoint was removed");
}

/// A raw client connection (hello answered).
fn raw_client(socket: &Path) -> UnixStream {
    let raw = UnixStream::connect(socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send(&raw, &Message::Hello { role: Role::Client, pid: 1, worker_kind: String::new() }, None).unwrap();
    assert!(matches!(recv(&raw).unwrap(), Some((Message::Welcome { .. }, _))));
    raw
}

/// Gives the daemon `area` over `raw`; its id.
fn raw_area(raw: &UnixStream, area: &pipeswitch::protocol::area::ClientArea, request_id: u64) -> Result<u64> {
    send(raw, &Message::InputArea { request_id, bytes: area.bytes() }, Some(area.fd())).unwrap();
    match recv(raw).unwrap() {
        Some((Message::InputAreaReady { request_id: id, area: a, bytes }, _)) => {
            assert_eq!((id, bytes), (request_id, area.bytes()));
            Ok(a)
        }
        Some((Message::Error { request_id: id, status, message }, _)) => {
            assert_eq!(id, request_id);
            Err(pipeswitch::client::error_of(status, message))
        }
        other => panic!("{other:?}"),
    }
}

fn lines_with(log: &Log, prefix: &str) -> Vec<String> {
    log.lines().into_iter().filter(|l| l.starts_with(prefix)).collect()
}

#[test]
fn input_areas_reach_every_worker_carry_the_inputs_and_go_with_their_client() {
    let w = world("areas");
    let s = setup(&w, 8 * MIB, 0);
    let log = Log::default();
    for _ in 0..2 {
        fake_worker_logged(&s.socket, s.seen.clone(), s.die_on.clone(), s.slow.clone(), log.clone());
    }
    wait_for(&s, "fake workers never became standbys", |c| c.stats().unwrap().standbys == 2);
    let mut c = client(&s);
    assert_eq!(c.input_area_bytes(), 0);
    // The first request with a large input reserves an area (16 MiB): both
    // workers map it before the task, whose large input comes from it.
    infer(&mut c, "a", 1).unwrap();
    assert_eq!(c.input_area_bytes(), 16 * MIB);
    // The idle worker logs its area when its thread gets to the message.
    wait_for(&s, "both workers never logged the area", |_| lines_with(&log, "area+").len() == 2);
    let added = lines_with(&log, "area+");
    let area: u64 = added[0].split(' ').nth(2).unwrap().parse().unwrap();
    assert!(added.iter().all(|l| l.ends_with(&format!(" {area} {}", 16 * MIB))), "{added:?}");
    assert_eq!(lines_with(&log, "inputs"), vec![format!("inputs {} a 1", last(&s.seen).0)], "the 200 kB input is in the area");
    // Bytes of every request come through, whatever was in the area before.
    for i in 2..6 {
        infer(&mut c, if i % 2 == 0 { "b" } else { "a" }, i).unwrap();
    }
    assert!(lines_with(&log, "inputs").iter().all(|l| l.ends_with(" 1")), "{:?}", log.lines());
    // Small inputs only: no area needed, none asked for.
    let mut small = client(&s);
    small.infer("a", &[TensorRef { name: "x", dtype: 1, shape: &[8], data: &[3; 8] }]).unwrap();
    assert_eq!(small.input_area_bytes(), 0);
    // A worker that joins later gets every area before its first task.
    let mut c2 = client(&s);
    assert_eq!(c2.reserve_inputs(MIB).unwrap(), MIB);
    fake_worker_logged(&s.socket, s.seen.clone(), s.die_on.clone(), s.slow.clone(), log.clone());
    wait_for(&s, "the third worker never got the areas", |_| lines_with(&log, "area+").len() == 6);
    for wid in 1..=3u32 {
        let mine: Vec<String> = lines_with(&log, &format!("area+ {wid} "));
        assert_eq!(mine.len(), 2, "two areas to each of three workers: {:?}", log.lines());
    }
    // A larger area replaces the old one: every worker drops the old.
    assert_eq!(c.reserve_inputs(32 * MIB).unwrap(), 32 * MIB);
    wait_for(&s, "the old area was never dropped", |_| lines_with(&log, "area- ").len() == 3);
    assert!(lines_with(&log, "area-").iter().all(|l| l.ends_with(&format!(" {area}"))), "{:?}", log.lines());
    infer(&mut c, "a", 9).unwrap();
    // The client leaves: its area goes from every worker; c2's stays.
    drop(c);
    wait_for(&s, "the area of a client that left was never dropped", |_| lines_with(&log, "area-").len() == 6);
    infer(&mut c2, "b", 10).unwrap();
    assert_eq!(lines_with(&log, "inputs").last().map(|l| l.ends_with(" 1")), Some(true), "{:?}", log.lines());
    let st = c2.stats().unwrap();
    assert_eq!(st.failed, 0);
}

#[test]
fn input_areas_are_checked_bounded_and_a_refused_client_sends_its_inputs_as_before() {
    let w = world("arealimits");
    let mut cfg = config(&w, 8 * MIB);
    cfg.max_input_area = 4 * MIB;
    cfg.input_areas_bytes = 6 * MIB;
    let daemon = Daemon::start(cfg, Box::new(FakeGpu { moves: Moves::default() })).unwrap();
    let socket = daemon.socket().to_path_buf();
    let (seen, die_on, slow, log) = (Seen::default(), Arc::new(Mutex::new(None)), Arc::new(AtomicBool::new(false)), Log::default());
    fake_worker_logged(&socket, seen.clone(), die_on.clone(), slow.clone(), log.clone());
    fake_worker_logged(&socket, seen.clone(), die_on.clone(), slow.clone(), log.clone());
    let mut c = Client::connect(&socket, Some(Duration::from_secs(10))).unwrap();
    let t0 = std::time::Instant::now();
    while c.stats().unwrap().standbys < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    // Automatic: 16 MiB is over the limit; the request goes with its own
    // file, and the next one does not ask again.
    infer(&mut c, "a", 1).unwrap();
    infer(&mut c, "a", 2).unwrap();
    assert_eq!(c.input_area_bytes(), 0);
    assert!(lines_with(&log, "area+").is_empty());
    assert!(lines_with(&log, "inputs").iter().all(|l| l.ends_with(" 0")), "{:?}", log.lines());
    // Explicitly: over the per-client limit, refused; within, accepted.
    let e = c.reserve_inputs(5 * MIB).unwrap_err();
    assert!(matches!(e, Error::Refused(_)) && e.to_string().contains("limit"), "{e}");
    assert_eq!(c.reserve_inputs(4 * MIB).unwrap(), 4 * MIB);
    infer(&mut c, "a", 3).unwrap();
    assert!(lines_with(&log, "inputs").last().unwrap().ends_with(" 1"), "{:?}", log.lines());
    // The total: 4 + 2 fit, 4 + 2 + 1 do not; replacing one's own area
    // counts only the new one.
    let mut c2 = Client::connect(&socket, Some(Duration::from_secs(10))).unwrap();
    assert_eq!(c2.reserve_inputs(2 * MIB).unwrap(), 2 * MIB);
    let mut c3 = Client::connect(&socket, Some(Duration::from_secs(10))).unwrap();
    let e = c3.reserve_inputs(MIB).unwrap_err();
    assert!(matches!(e, Error::Refused(_)) && e.to_string().contains("do"), "{e}");
    assert_eq!(c.reserve_inputs(2 * MIB).unwrap(), 2 * MIB);
    assert_eq!(c3.reserve_inputs(MIB).unwrap(), MIB);
    // 5 of 6 MiB taken: room for the raw peer's small areas below.
    // A refused replacement keeps the area the client had.
    assert!(c2.reserve_inputs(5 * MIB).is_err());
    assert_eq!(c2.input_area_bytes(), 2 * MIB);
    infer(&mut c2, "b", 4).unwrap();

    // Raw peers: a file that could shrink, one too small, no file.
    let raw = raw_client(&socket);
    let unsealed = tempfile::tempfile().unwrap();
    unsealed.set_len(MIB).unwrap();
    send(&raw, &Message::InputArea { request_id: 7, bytes: MIB }, Some(unsealed.as_fd())).unwrap();
    match recv(&raw).unwrap() {
        Some((Message::Error { request_id: 7, status, message }, _)) => assert!(status == 101 && message.contains("sealed"), "{status} {message}"),
        other => panic!("{other:?}"),
    }
    let small = pipeswitch::protocol::area::ClientArea::create(4096).unwrap();
    send(&raw, &Message::InputArea { request_id: 8, bytes: MIB }, Some(small.fd())).unwrap();
    match recv(&raw).unwrap() {
        Some((Message::Error { request_id: 8, status, message }, _)) => assert!(status == 101 && message.contains("file of 4096"), "{status} {message}"),
        other => panic!("{other:?}"),
    }
    send(&raw, &Message::InputArea { request_id: 9, bytes: MIB }, None).unwrap();
    match recv(&raw).unwrap() {
        Some((Message::Error { request_id: 9, .. }, _)) => {}
        other => panic!("{other:?}"),
    }
    // Requests that name another's area, or bytes outside their own.
    let mine = pipeswitch::protocol::area::ClientArea::create(64 << 10).unwrap();
    let id = raw_area(&raw, &mine, 10).unwrap();
    let tensor = |area, offset, bytes| pipeswitch::protocol::Tensor {
        name: "y".into(),
        dtype: 1,
        shape: vec![bytes],
        data: TensorData::Area { area, offset, bytes },
    };
    for (rid, t, want) in [(11, tensor(id + 100, 0, 16), "not this client's"), (12, tensor(id, 60 << 10, 8 << 10), "outside")] {
        send(&raw, &Message::Infer { request_id: rid, model: "a".into(), inputs: vec![t] }, None).unwrap();
        match recv(&raw).unwrap() {
            Some((Message::Error { request_id, status, message }, _)) => {
                assert_eq!(request_id, rid);
                assert!(status == 101 && message.contains(want), "{status} {message}");
            }
            other => panic!("{other:?}"),
        }
    }
    // In range: served from the area.
    send(&raw, &Message::Infer { request_id: 13, model: "a".into(), inputs: vec![tensor(id, 256, 1000)] }, None).unwrap();
    match recv(&raw).unwrap() {
        Some((Message::InferResult { request_id: 13, outputs, .. }, _)) => assert_eq!(outputs.len(), 1),
        other => panic!("{other:?}"),
    }
    // A request queued behind a slow one, whose area its client replaces
    // meanwhile: it fails clearly; the client's next request is served.
    slow.store(true, Ordering::Relaxed);
    let busy = std::thread::spawn({
        let socket = socket.clone();
        move || {
            let mut other = Client::connect(&socket, Some(Duration::from_secs(10))).unwrap();
            other.infer("b", &[]).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    send(&raw, &Message::Infer { request_id: 14, model: "a".into(), inputs: vec![tensor(id, 0, 100)] }, None).unwrap();
    let next = pipeswitch::protocol::area::ClientArea::create(64 << 10).unwrap();
    send(&raw, &Message::InputArea { request_id: 15, bytes: next.bytes() }, Some(next.fd())).unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        match recv(&raw).unwrap() {
            Some((Message::InputAreaReady { request_id: 15, area, .. }, _)) => got.push(format!("ready {}", area > id)),
            Some((Message::Error { request_id: 14, message, .. }, _)) => {
                assert!(message.contains("replaced"), "{message}");
                got.push("failed".into());
            }
            other => panic!("{other:?}"),
        }
    }
    got.sort();
    assert_eq!(got, vec!["failed".to_string(), "ready true".to_string()]);
    busy.join().unwrap();
    slow.store(false, Ordering::Relaxed);
    drop(daemon);
}
