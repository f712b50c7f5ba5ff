//! `pipeswitch serve`: the daemon that owns one GPU.
//!
//! It owns the store, the device arena and the residency decisions, keeps a
//! number of standby workers ready (processes with their CUDA context,
//! kernels and pinned store set up), queues inference requests from clients
//! and runs one task on the GPU at a time:
//!
//! - a request for the model the active worker serves goes to that worker
//!   (no switch, no copy);
//! - otherwise the active worker is taken off its model (it cleans up and
//!   returns to standby off the critical path), the residency policy places
//!   the model (a hit: no copy; a miss: evictions, maybe moves done here on
//!   the GPU), and a standby is activated with the region, the plan and the
//!   inputs: it starts the pipelined switch and its first run at once.
//!
//! Connections: a Unix socket in a private directory (0700, socket 0600);
//! peers of another user are refused (`SO_PEERCRED`); a second daemon for the
//! same GPU is refused (a lock file beside the socket). Messages: see
//! [`pipeswitch::protocol`]. One reader thread per connection turns frames
//! into events for one controller thread, which owns all state.
//!
//! Training (one job at a time): a client submits a job (`TrainSubmit`,
//! a Python entry point with its options); when the GPU is idle the job
//! starts on a standby worker, which then belongs to the job (state
//! `Training`) until it ends, running or parked with the job's state. The
//! job's policy ([`crate::train_policy`]) decides when inference stops it
//! (`Preempt`: the worker abandons its step or finishes it, saves the state
//! resident or to pinned host memory and answers `TrainStopped`; queued
//! requests wait for that answer) and when it resumes (`TrainStart` again,
//! to the worker that holds the state). Under `SaveMode::Auto` (the
//! default) the daemon decides where the state waits: it accounts the state
//! the worker reports (`TrainProgress::state_bytes`) in the residency policy
//! as a held reservation while the state is on the GPU (so models are
//! evicted for it, and admitted only into the room it leaves), and at each
//! preemption keeps it resident unless a queued request's model needs the
//! room it holds (then: written back, the reservation released). A job paused
//! with its state resident is asked to write it back (a `Preempt` with
//! `Host` to its idle worker) before such a request starts. A training worker that dies is
//! replaced and the job resumes from its last checkpoint (a shared-memory
//! file that outlives the worker), or fails with a clear error if it has
//! none; so does one that does not stop in time.
//!
//! Input areas: a client may give its own shared-memory file for its
//! requests' inputs (`InputArea`; see [`pipeswitch::protocol`]). The daemon
//! checks it (sealed against shrinking, big enough, within the per-area and
//! total limits), passes it to every worker (`AreaAdd`; a new worker gets
//! every area right after its welcome), checks that each request's area
//! tensors name the client's current area and lie inside it, and tells the
//! workers to drop it (`AreaDrop`) when the client leaves or replaces it;
//! a queued request that names a replaced area fails.
//!
//! Faults: a worker that dies (its socket closes) fails its request with a
//! clear error, its model is no longer resident if it was being copied, its
//! region is reclaimed and a replacement standby is started. A client that
//! leaves has its queued requests dropped and its running one's result
//! discarded.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pipeswitch::arena::allocator::OffsetAllocator;
use pipeswitch::arena::REGION_ALIGN;
use pipeswitch::error::{Error, Result};
use pipeswitch::ffi::status::{status_of, PS_ERR_REFUSED};
use pipeswitch::protocol::area;
use pipeswitch::protocol::io::{recv, send};
use pipeswitch::protocol::{
    monotonic_ns, socket_path, JobState, Message, Progress, Role, SaveMode, Stats, StopReason, Task, TaskKind, Tensor, TensorData, Timing,
    TrainJob, TrainTask,
};
use pipeswitch::residency::{Acquire, ResidencyPolicy, Ticket};
use pipeswitch::store::{Model, Store};

use crate::train_policy::{Scheduler, Training};

/// What the daemon needs from the GPU: the arena's export handle and space,
/// device-to-device moves inside it, and the H2D figures that plans use. The
/// real one is [`CudaGpu`]; the control-plane tests use a fake.
pub trait Gpu: Send + 'static {
    fn device(&self) -> i32;
    /// The arena's 128-byte IPC handle, for workers.
    fn arena_handle(&self) -> Vec<u8>;
    /// Bytes of the arena's model space (regions are offsets below this).
    fn model_space(&self) -> u64;
    /// Moves `bytes` inside the arena from `from` to `to` (`to < from`, the
    /// ranges may overlap) and waits for the move.
    fn move_bytes(&mut self, from: u64, to: u64, bytes: u64) -> Result<()>;
    /// H2D bandwidth in GB/s and per-copy overhead in ms, for plans.
    fn h2d(&self) -> (f64, f64);
}

/// The daemon's settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub device: i32,
    pub store: String,
    pub socket_dir: PathBuf,
    /// Bytes of the arena that keep models resident.
    pub residency_bytes: u64,
    /// Bytes of the arena each worker gets for its activations.
    pub worker_region_bytes: u64,
    /// Standby workers kept ready (the daemon starts them; workers that
    /// connect on their own are used as well).
    pub standbys: usize,
    /// One worker serves every model: it is taken off its model and set up
    /// for the next one on the critical path (the paper's single-worker
    /// ablation). Use with `standbys: 0`.
    pub single_worker: bool,
    /// A new worker process for every task, started when the task arrives
    /// and ended after it (the paper's stop-and-start ablation of workers:
    /// process start, CUDA context and set-up on the critical path). Use
    /// with `standbys: 0`.
    pub process_per_task: bool,
    /// The worker command (program and arguments). The daemon passes the
    /// socket in `PIPESWITCH_SOCKET`.
    pub worker_cmd: Vec<OsString>,
    /// Requests queued at most; more are refused.
    pub max_queue: usize,
    /// How long a connection may take to say hello.
    pub hello_timeout: Duration,
    /// How long a worker may take to start and report standby.
    pub worker_start_timeout: Duration,
    /// The largest input area a client may give (bytes).
    pub max_input_area: u64,
    /// The bytes of all clients' input areas together (each worker maps
    /// and page-locks every area).
    pub input_areas_bytes: u64,
}

/// Default of [`ServeConfig::max_input_area`].
pub const DEFAULT_MAX_INPUT_AREA: u64 = 256 << 20;
/// Default of [`ServeConfig::input_areas_bytes`].
pub const DEFAULT_INPUT_AREAS_BYTES: u64 = 1 << 30;

/// A running daemon (see [`Daemon::start`]).
pub struct Daemon {
    events: Sender<Event>,
    controller: Option<JoinHandle<Result<()>>>,
    socket: PathBuf,
    lock_path: PathBuf,
    /// Tells the accepting thread to leave.
    closing: Arc<AtomicBool>,
    _lock: File,
}

type ConnId = u64;

enum Event {
    Joined { conn: ConnId, role: Role, pid: u32, kind: String, stream: UnixStream },
    Msg { conn: ConnId, msg: Message, file: Option<OwnedFd> },
    Left { conn: ConnId, why: String },
    Stop,
}

/// Creates (or checks) the private socket directory: owned by us, mode 0700,
/// not a symbolic link.
pub fn private_dir(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("chmod 0700 {}", dir.display()), e))
        }
        Err(e) => Err(Error::io(format!("checking {}", dir.display()), e)),
        Ok(m) => {
            if !m.file_type().is_dir() {
                return Err(Error::Refused(format!("{} is not a directory (a symbolic link?)", dir.display())));
            }
            if m.uid() != nix::unistd::geteuid().as_raw() {
                return Err(Error::Refused(format!("{} belongs to user {}, not to this user", dir.display(), m.uid())));
            }
            if m.mode() & 0o077 != 0 {
                return Err(Error::Refused(format!(
                    "{} has mode {:o}: other users could reach the socket; make it 0700",
                    dir.display(),
                    m.mode() & 0o777
                )));
            }
            Ok(())
        }
    }
}

fn take_lock(path: &Path, device: i32) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode_0600()
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    // SAFETY: a valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = std::fs::read_to_string(path).unwrap_or_default();
        return Err(Error::Refused(format!(
            "another pipeswitch daemon (pid {}) serves GPU {device}: {} is locked",
            pid.trim(),
            path.display()
        )));
    }
    f.set_len(0).map_err(|e| Error::io("truncating the lock file", e))?;
    std::io::Write::write_all(&mut &f, format!("{}\n", std::process::id()).as_bytes())
        .map_err(|e| Error::io("writing the lock file", e))?;
    Ok(f)
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}
impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

impl Daemon {
    /// Starts serving: the socket accepts connections from now on. Fails
    /// (with the reason) if another daemon serves the GPU, the directory is
    /// not private, the store cannot be opened or the space does not add up.
    pub fn start(config: ServeConfig, gpu: Box<dyn Gpu>) -> Result<Daemon> {
        private_dir(&config.socket_dir)?;
        let socket = socket_path(&config.socket_dir, config.device);
        let lock_path = config.socket_dir.join(format!("gpu{}.lock", config.device));
        let lock = take_lock(&lock_path, config.device)?;
        let store = Arc::new(Store::open(&config.store)?);
        let need = config
            .residency_bytes
            .checked_add((config.standbys as u64 + 1).saturating_mul(config.worker_region_bytes))
            .ok_or_else(|| Error::invalid("arena sizes overflow"))?;
        if need > gpu.model_space() {
            return Err(Error::invalid(format!(
                "residency ({}) plus {} worker regions of {} need {need} bytes; the arena has {}",
                config.residency_bytes,
                config.standbys + 1,
                config.worker_region_bytes,
                gpu.model_space()
            )));
        }
        // We hold the lock: a socket file left there is a dead daemon's.
        let _ = std::fs::remove_file(&socket);
        sweep_checkpoints(config.device);
        let listener = UnixListener::bind(&socket).map_err(|e| Error::io(format!("binding {}", socket.display()), e))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("chmod 0600 {}", socket.display()), e))?;
        let (tx, rx) = channel();
        let closing = Arc::new(AtomicBool::new(false));
        spawn_acceptor(listener, tx.clone(), config.hello_timeout, closing.clone());
        let mut ctl = Controller::new(config, gpu, store, socket.clone())?;
        let controller = std::thread::Builder::new()
            .name("pipeswitch-controller".into())
            .spawn(move || ctl.run(rx))
            .map_err(|e| Error::io("starting the controller thread", e))?;
        tracing::info!("serving on {}", socket.display());
        Ok(Daemon { events: tx, controller: Some(controller), socket, lock_path, closing, _lock: lock })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops: refuses new work, ends the workers, removes the socket.
    pub fn stop(mut self) -> Result<()> {
        let _ = self.events.send(Event::Stop);
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        let r = match self.controller.take() {
            Some(h) => h.join().unwrap_or_else(|_| Err(Error::Internal("the controller thread panicked".into()))),
            None => Ok(()),
        };
        // Wake the accepting thread so that it sees `closing`.
        self.closing.store(true, Ordering::Release);
        let _ = UnixStream::connect(&self.socket);
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.lock_path);
        r
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.controller.is_some() {
            let _ = self.events.send(Event::Stop);
            let _ = self.finish();
        }
    }
}

fn spawn_acceptor(listener: UnixListener, tx: Sender<Event>, hello_timeout: Duration, closing: Arc<AtomicBool>) {
    let me = nix::unistd::geteuid().as_raw();
    let _ = std::thread::Builder::new().name("pipeswitch-accept".into()).spawn(move || {
        let mut next: ConnId = 1;
        for stream in listener.incoming() {
            if closing.load(Ordering::Acquire) {
                return;
            }
            let Ok(stream) = stream else { continue };
            let conn = next;
            next += 1;
            let tx = tx.clone();
            let _ = std::thread::Builder::new().name(format!("pipeswitch-conn-{conn}")).spawn(move || {
                serve_connection(conn, stream, tx, hello_timeout, me);
            });
        }
    });
}

/// Removes the training checkpoints (`pipeswitch-train-<pid>-…-gpu<device>-…`
/// in the shared-memory directory) that daemons of this user for `device`
/// left when they were killed: their pid no longer runs.
fn sweep_checkpoints(device: i32) {
    let Ok(probe) = pipeswitch::store::shm::path_of("train-probe") else { return };
    let (Some(dir), Some(prefix)) = (probe.parent(), probe.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix("probe"))) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let me = nix::unistd::getuid().as_raw();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else { continue };
        let mut parts = rest.split('-');
        let (Some(pid), Some(_nonce), Some(gpu)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        if gpu != format!("gpu{device}") || pid <= 0 || e.metadata().map_or(true, |m| m.uid() != me) {
            continue;
        }
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH) {
            tracing::info!("removing {}: a checkpoint of a daemon that is gone", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// One connection: credentials, hello, then frames until it closes.
fn serve_connection(conn: ConnId, stream: UnixStream, tx: Sender<Event>, hello_timeout: Duration, me: u32) {
    let refuse = |stream: &UnixStream, status: u32, message: String| {
        tracing::warn!("connection {conn} refused: {message}");
        let _ = send(stream, &Message::Error { request_id: 0, status, message }, None);
        // Let the peer read the refusal: closing with its bytes unread
        // would reset the connection instead.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let mut sink = [0u8; 4096];
        while matches!(std::io::Read::read(&mut &*stream, &mut sink), Ok(n) if n > 0) {}
    };
    match nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::PeerCredentials) {
        Ok(c) if c.uid() == me => {}
        Ok(c) => return refuse(&stream, PS_ERR_REFUSED, format!("user {} may not use the daemon of user {me}", c.uid())),
        Err(e) => return refuse(&stream, PS_ERR_REFUSED, format!("no peer credentials: {e}")),
    }
    let _ = stream.set_read_timeout(Some(hello_timeout));
    let (role, pid, kind) = match recv(&stream) {
        Ok(Some((Message::Hello { role, pid, worker_kind }, None))) => (role, pid, worker_kind),
        Ok(Some((m, _))) => return refuse(&stream, PS_ERR_REFUSED, format!("the first message must be hello, not kind {}", m.kind())),
        Ok(None) => return,
        Err(e) => return refuse(&stream, status_of(&e), format!("no hello: {e}")),
    };
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let Ok(writer) = stream.try_clone() else { return };
    if tx.send(Event::Joined { conn, role, pid, kind, stream: writer }).is_err() {
        return;
    }
    loop {
        match recv(&stream) {
            Ok(Some((msg, file))) => {
                if tx.send(Event::Msg { conn, msg, file }).is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = tx.send(Event::Left { conn, why: "closed the connection".into() });
                return;
            }
            Err(e) => {
                // A malformed frame ends the connection: its stream position is lost.
                let _ = send(&stream, &Message::Error { request_id: 0, status: status_of(&e), message: e.to_string() }, None);
                let _ = tx.send(Event::Left { conn, why: e.to_string() });
                return;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WState {
    /// Spawned, not yet connected and ready.
    Starting,
    Standby,
    /// Serving a model (holding it resident).
    Active,
    /// Deactivated, cleaning up: answers standby when done.
    Leaving,
    /// Belongs to the training job: running it or holding its state.
    Training,
}

/// Restarts of a training job from its checkpoint after its worker died.
const MAX_TRAIN_RESTARTS: u32 = 3;

/// The training job.
struct JobRec {
    id: u64,
    job: TrainJob,
    state: JobState,
    /// The worker running the job or holding its state.
    worker: Option<u32>,
    task_id: u64,
    /// Iterations completed.
    iteration: u64,
    /// The iteration of the last checkpoint in the file (0: none).
    checkpoint: u64,
    preemptions: u64,
    restarts: u32,
    status: u32,
    message: String,
    sched: Scheduler,
    checkpoint_path: PathBuf,
    /// When the preemption was sent.
    stop_sent: Option<Instant>,
    cancel: bool,
    /// The bytes of the job's state on the GPU, as its worker last reported.
    state_bytes: u64,
    /// `SaveMode::Auto`: the residency reservation of the state while it is
    /// on the GPU, and its bytes.
    reserved: Option<(Ticket, u64)>,
    /// Where the last preemption put the state.
    saving: SaveMode,
    /// The preemption under way writes back the state of a paused job.
    writing_back: bool,
}

impl JobRec {
    fn terminal(&self) -> bool {
        matches!(self.state, JobState::Finished | JobState::Failed | JobState::Cancelled)
    }

    fn status_msg(&self, request_id: u64) -> Message {
        Message::TrainStatus {
            request_id,
            job_id: self.id,
            state: self.state,
            iteration: self.iteration,
            checkpoint: self.checkpoint,
            preemptions: self.preemptions,
            status: self.status,
            message: self.message.clone(),
        }
    }
}

struct WorkerRec {
    id: u32,
    pid: u32,
    child: Option<Child>,
    conn: Option<ConnId>,
    state: WState,
    region: (u64, u64),
    started: Instant,
    /// The model this worker is active on, with the residency ticket that
    /// keeps it placed.
    model: Option<(ModelId, Ticket)>,
    /// What its hello said it is ("builtin", "torch", ...; empty before).
    kind: String,
}

/// The kind of worker that cannot run training jobs (`pipeswitch worker`).
const BUILTIN_KIND: &str = "builtin";

impl WorkerRec {
    /// Whether a training job may run on it: any connected worker but the
    /// built-in PTX one.
    fn can_train(&self) -> bool {
        self.conn.is_some() && self.kind != BUILTIN_KIND
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ModelId {
    name: String,
    id: u64,
}

impl ModelId {
    /// The residency policy's key of training job `job`'s state: no stored
    /// model has this id (a store's ids count up from 1 and are never reused).
    fn training_state(job: u64) -> ModelId {
        ModelId { name: format!("training job {job}"), id: u64::MAX }
    }
}

/// A client's input area (whose: `Controller::client_area`).
struct AreaRec {
    bytes: u64,
    file: OwnedFd,
}

struct Request {
    client: ConnId,
    request_id: u64,
    model: String,
    inputs: Vec<Tensor>,
    file: Option<OwnedFd>,
    arrived: Instant,
}

struct Running {
    task_id: u64,
    /// The task's own use of its model when its worker was already active
    /// on it (otherwise the worker's use covers the task).
    ticket: Option<Ticket>,
    worker: u32,
    client: Option<ConnId>,
    request_id: u64,
    model: ModelId,
    /// The copy into the region was started by this task.
    loading: bool,
    arrived: Instant,
    queued_ms: f64,
}

struct Controller {
    cfg: ServeConfig,
    gpu: Box<dyn Gpu>,
    store: Arc<Store>,
    socket: PathBuf,
    conns: HashMap<ConnId, (Role, UnixStream)>,
    workers: Vec<WorkerRec>,
    next_worker: u32,
    space: OffsetAllocator,
    residency_offset: u64,
    policy: ResidencyPolicy<ModelId>,
    plans: HashMap<u64, Vec<u32>>,
    queue: VecDeque<Request>,
    running: Option<Running>,
    next_task: u64,
    stats: Stats,
    stopping: bool,
    /// Workers that died before they were ready, in a row: spawning backs
    /// off (0.1 s doubling up to 10 s) so a broken worker command does not
    /// spin.
    failed_starts: u32,
    next_spawn: Instant,
    /// Processes of retired workers, reaped once they exit.
    exiting: Vec<Child>,
    /// The training job (the last one, once it ended).
    job: Option<JobRec>,
    next_job: u64,
    /// The training policy's clock starts here.
    epoch: Instant,
    /// This daemon's number in its process (checkpoint file names).
    nonce: Option<u64>,
    /// Clients' input areas by id, and each client's current one.
    areas: HashMap<u64, AreaRec>,
    client_area: HashMap<ConnId, u64>,
    next_area: u64,
}

impl Controller {
    fn new(cfg: ServeConfig, gpu: Box<dyn Gpu>, store: Arc<Store>, socket: PathBuf) -> Result<Controller> {
        let mut space = OffsetAllocator::new(gpu.model_space());
        let residency_offset = space.alloc(cfg.residency_bytes, REGION_ALIGN)?;
        let policy = ResidencyPolicy::new(cfg.residency_bytes, REGION_ALIGN)?;
        Ok(Controller {
            cfg,
            gpu,
            store,
            socket,
            conns: HashMap::new(),
            workers: Vec::new(),
            next_worker: 1,
            space,
            residency_offset,
            policy,
            plans: HashMap::new(),
            queue: VecDeque::new(),
            running: None,
            next_task: 1,
            stats: Stats::default(),
            stopping: false,
            failed_starts: 0,
            next_spawn: Instant::now(),
            exiting: Vec::new(),
            job: None,
            next_job: 1,
            epoch: Instant::now(),
            nonce: None,
            areas: HashMap::new(),
            client_area: HashMap::new(),
            next_area: 1,
        })
    }

    fn run(&mut self, rx: Receiver<Event>) -> Result<()> {
        self.keep_standbys();
        loop {
            // A training job's policy runs on a finer clock.
            let tick = if self.job.as_ref().is_some_and(|j| !j.terminal()) { 5 } else { 50 };
            match rx.recv_timeout(Duration::from_millis(tick)) {
                Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(ev) => self.on_event(ev),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.housekeeping();
            self.dispatch();
        }
        self.shutdown(&rx);
        Ok(())
    }

    fn send_to(&mut self, conn: ConnId, msg: &Message, file: Option<&OwnedFd>) -> bool {
        let Some((_, s)) = self.conns.get(&conn) else { return false };
        match send(s, msg, file.map(|f| f.as_fd())) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("connection {conn}: {e}");
                false
            }
        }
    }

    fn reply_error(&mut self, conn: ConnId, request_id: u64, e: &Error) {
        self.stats.failed += 1;
        let _ = self.send_to(conn, &Message::Error { request_id, status: status_of(e), message: e.to_string() }, None);
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Joined { conn, role, pid, kind, stream } => self.joined(conn, role, pid, kind, stream),
            Event::Msg { conn, msg, file } => self.message(conn, msg, file),
            Event::Left { conn, why } => self.left(conn, &why),
            Event::Stop => {}
        }
    }

    fn joined(&mut self, conn: ConnId, role: Role, pid: u32, kind: String, stream: UnixStream) {
        let welcome = |worker_id, region: (u64, u64), handle: Vec<u8>, cfg: &ServeConfig| Message::Welcome {
            daemon_pid: std::process::id(),
            device: cfg.device,
            store: cfg.store.clone(),
            worker_id,
            arena_handle: handle,
            activation_offset: region.0,
            activation_bytes: region.1,
        };
        self.conns.insert(conn, (role, stream));
        match role {
            Role::Client => {
                let w = welcome(0, (0, 0), Vec::new(), &self.cfg);
                self.send_to(conn, &w, None);
            }
            Role::Worker => {
                let idx = match self.workers.iter().position(|w| w.pid == pid && w.conn.is_none() && w.state == WState::Starting) {
                    Some(i) => i,
                    None => match self.new_worker(pid, None) {
                        Ok(i) => i,
                        Err(e) => {
                            self.reply_error(conn, 0, &e);
                            self.conns.remove(&conn);
                            return;
                        }
                    },
                };
                self.workers[idx].conn = Some(conn);
                self.workers[idx].kind = kind;
                let w = welcome(self.workers[idx].id, self.workers[idx].region, self.gpu.arena_handle(), &self.cfg);
                if !self.send_to(conn, &w, None) {
                    return self.worker_lost(idx, "could not be welcomed");
                }
                // Every client's input area, before any task names one.
                let mut ids: Vec<u64> = self.areas.keys().copied().collect();
                ids.sort_unstable();
                for id in ids {
                    if !self.send_area(conn, id) {
                        let i = self.worker_index(conn).unwrap_or(idx);
                        return self.worker_lost(i, "could not be given the input areas");
                    }
                }
            }
        }
    }

    /// Records a worker with a new activation region.
    fn new_worker(&mut self, pid: u32, child: Option<Child>) -> Result<usize> {
        let offset = self.space.alloc(self.cfg.worker_region_bytes, REGION_ALIGN)?;
        Ok(self.add_worker(pid, child, offset))
    }

    /// Records a worker with its activation region at `offset`.
    fn add_worker(&mut self, pid: u32, child: Option<Child>, offset: u64) -> usize {
        let id = self.next_worker;
        self.next_worker += 1;
        self.workers.push(WorkerRec {
            id,
            pid,
            child,
            conn: None,
            state: WState::Starting,
            region: (offset, self.cfg.worker_region_bytes),
            started: Instant::now(),
            model: None,
            kind: String::new(),
        });
        self.stats.workers_started += 1;
        self.workers.len() - 1
    }

    fn spawn_worker(&mut self) -> Result<()> {
        let (prog, args) = self.cfg.worker_cmd.split_first().ok_or_else(|| Error::invalid("no worker command"))?;
        // Its region first: no process is started that could not get one.
        let offset = self.space.alloc(self.cfg.worker_region_bytes, REGION_ALIGN)?;
        let child = match Command::new(prog).args(args).env("PIPESWITCH_SOCKET", &self.socket).stdin(std::process::Stdio::null()).spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = self.space.release(offset);
                return Err(Error::io(format!("starting worker {}", prog.to_string_lossy()), e));
            }
        };
        let pid = child.id();
        tracing::info!("started worker process {pid}");
        self.add_worker(pid, Some(child), offset);
        Ok(())
    }

    fn keep_standbys(&mut self) {
        if self.stopping || Instant::now() < self.next_spawn {
            return;
        }
        let ready = self.workers.iter().filter(|w| matches!(w.state, WState::Starting | WState::Standby | WState::Leaving)).count();
        // Without standbys one worker must still exist in the ablations: the
        // single worker at once, a process per task once a request waits.
        let need_one = self.workers.is_empty() && (self.cfg.single_worker || (self.cfg.process_per_task && !self.queue.is_empty()));
        for _ in ready..self.cfg.standbys.max(usize::from(need_one)) {
            if let Err(e) = self.spawn_worker() {
                // E.g. no room for another region while training and
                // inference hold theirs: try again in a second, not at
                // every tick.
                tracing::warn!("could not start a standby worker (retrying in 1 s): {e}");
                self.next_spawn = Instant::now() + Duration::from_secs(1);
                break;
            }
        }
    }

    fn housekeeping(&mut self) {
        // Children that exited without their connection closing first
        // (e.g. before they connected), and workers that never came up.
        let mut lost = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Some(c) = w.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    w.child = None;
                    if w.conn.is_none() {
                        lost.push((i, format!("exited before it connected ({status})")));
                    }
                }
            }
            if matches!(w.state, WState::Starting | WState::Leaving) && w.started.elapsed() > self.cfg.worker_start_timeout {
                lost.push((i, "did not report standby in time".into()));
            }
        }
        if let Some(j) = self.job.as_ref().filter(|j| j.state == JobState::Preempting) {
            if j.stop_sent.is_some_and(|t| t.elapsed() > self.cfg.worker_start_timeout) {
                if let Some(i) = self.workers.iter().position(|w| Some(w.id) == j.worker) {
                    if !lost.iter().any(|(k, _)| *k == i) {
                        lost.push((i, format!("training did not stop within {:?} of its preemption", self.cfg.worker_start_timeout)));
                        lost.sort_by_key(|(k, _)| *k);
                    }
                }
            }
        }
        for (i, why) in lost.into_iter().rev() {
            self.worker_lost(i, &why);
        }
        self.exiting.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        self.keep_standbys();
    }

    fn worker_index(&self, conn: ConnId) -> Option<usize> {
        self.workers.iter().position(|w| w.conn == Some(conn))
    }

    fn message(&mut self, conn: ConnId, msg: Message, file: Option<OwnedFd>) {
        let role = self.conns.get(&conn).map(|c| c.0);
        match (role, msg) {
            (Some(Role::Client), Message::Infer { request_id, model, inputs }) => {
                self.stats.requests += 1;
                if self.stopping {
                    return self.reply_error(conn, request_id, &Error::Refused("the daemon is stopping".into()));
                }
                if let Err(e) = self.check_area_tensors(conn, &inputs) {
                    return self.reply_error(conn, request_id, &e);
                }
                if self.queue.len() >= self.cfg.max_queue {
                    return self.reply_error(conn, request_id, &Error::Refused(format!("the queue is full ({} requests)", self.cfg.max_queue)));
                }
                self.queue.push_back(Request { client: conn, request_id, model, inputs, file, arrived: Instant::now() });
            }
            (Some(_), Message::StatsRequest) => {
                let mut s = self.stats;
                let c = self.policy.counters();
                (s.hits, s.misses, s.evictions) = (c.hits, c.misses, c.evictions);
                s.workers = self.workers.len() as u32;
                s.standbys = self.workers.iter().filter(|w| w.state == WState::Standby).count() as u32;
                self.send_to(conn, &Message::StatsReply(s), None);
            }
            (Some(Role::Worker), Message::Standby { worker_id }) => {
                if let Some(i) = self.worker_index(conn) {
                    if self.workers[i].id != worker_id {
                        tracing::warn!("worker {} reported standby as {worker_id}", self.workers[i].id);
                    }
                    if self.running.as_ref().is_some_and(|r| r.worker == self.workers[i].id) {
                        return self.worker_lost(i, "reported standby in the middle of a task");
                    }
                    if self.workers[i].state == WState::Training {
                        // It dropped the job's state: as if it had died.
                        let wid = self.workers[i].id;
                        self.job_lost(wid, "its worker dropped the job's state");
                    }
                    self.release_model(i);
                    self.workers[i].state = WState::Standby;
                    self.failed_starts = 0;
                }
            }
            (Some(Role::Worker), Message::TaskDone { task_id, status, message, outputs, timing }) => {
                self.task_done(conn, task_id, status, message, outputs, timing, file);
            }
            (Some(Role::Client), Message::InputArea { request_id, bytes }) => self.input_area(conn, request_id, bytes, file),
            (Some(Role::Client), Message::TrainSubmit { request_id, job }) => self.train_submit(conn, request_id, job),
            (Some(Role::Client), Message::TrainQuery { request_id, job_id, cancel }) => self.train_query(conn, request_id, job_id, cancel),
            (Some(Role::Worker), Message::TrainProgress { task_id, event, iteration, checkpoint, state_bytes }) => {
                let Some(i) = self.worker_index(conn) else { return };
                let wid = self.workers[i].id;
                if let Some(j) = self.job.as_mut().filter(|j| j.task_id == task_id && j.worker == Some(wid)) {
                    j.iteration = iteration;
                    if event == Progress::Checkpoint || checkpoint > j.checkpoint {
                        j.checkpoint = checkpoint;
                    }
                    if state_bytes > 0 && j.state == JobState::Running {
                        j.state_bytes = state_bytes;
                        self.reserve_state();
                    }
                }
            }
            (Some(Role::Worker), Message::TrainStopped { task_id, reason, iteration, checkpoint, status, message, stop_ms, save_ms }) => {
                self.train_stopped(conn, task_id, reason, iteration, checkpoint, status, message, stop_ms, save_ms);
            }
            (Some(role), m) => {
                let e = Error::Protocol(format!("a {role:?} may not send message kind {}", m.kind()));
                tracing::warn!("connection {conn}: {e}");
                self.reply_error(conn, 0, &e);
            }
            (None, _) => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn task_done(&mut self, conn: ConnId, task_id: u64, status: u32, message: String, outputs: Vec<Tensor>, timing: Timing, file: Option<OwnedFd>) {
        self.finish_task(conn, task_id, status, message, outputs, timing, file);
        if self.cfg.process_per_task {
            if let Some(i) = self.worker_index(conn) {
                self.retire(i);
            }
        }
    }

    /// Ends a worker that did nothing wrong (a process per task): it is told
    /// to leave, its region and its model go back, its process is reaped later.
    fn retire(&mut self, i: usize) {
        self.release_model(i);
        let mut w = self.workers.remove(i);
        if let Some(conn) = w.conn.take() {
            self.send_to(conn, &Message::Shutdown, None);
            self.conns.remove(&conn);
        }
        if let Some(c) = w.child.take() {
            self.exiting.push(c);
        }
        if let Err(e) = self.space.release(w.region.0) {
            tracing::error!("releasing worker region: {e}");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_task(&mut self, conn: ConnId, task_id: u64, status: u32, message: String, outputs: Vec<Tensor>, timing: Timing, file: Option<OwnedFd>) {
        let Some(i) = self.worker_index(conn) else { return };
        let Some(run) = self.running.take_if(|r| r.task_id == task_id && r.worker == self.workers[i].id) else {
            tracing::warn!("worker {} finished task {task_id}, which it was not running", self.workers[i].id);
            return;
        };
        self.end_use(run.ticket);
        if status == 0 {
            if run.loading {
                if let Err(e) = self.policy.loaded(&run.model) {
                    tracing::error!("residency: {e}");
                }
            }
            if let Some(client) = run.client {
                let t = Timing { queued_ms: run.queued_ms, total_ms: run.arrived.elapsed().as_secs_f64() * 1e3, ..timing };
                if !self.send_to(client, &Message::InferResult { request_id: run.request_id, outputs, timing: t }, file.as_ref()) {
                    tracing::warn!("client {client} left before its result");
                }
            }
        } else {
            // What a failed task wrote into the region cannot be trusted.
            if run.loading {
                let _ = self.policy.failed(&run.model);
                self.release_model(i);
            }
            if let Some(client) = run.client {
                self.stats.failed += 1;
                let _ = self.send_to(client, &Message::Error { request_id: run.request_id, status, message }, None);
            }
        }
    }

    fn left(&mut self, conn: ConnId, why: &str) {
        let Some((role, _)) = self.conns.remove(&conn) else { return };
        match role {
            Role::Client => {
                self.queue.retain(|r| r.client != conn);
                if let Some(r) = self.running.as_mut().filter(|r| r.client == Some(conn)) {
                    r.client = None;
                }
                if let Some(id) = self.client_area.remove(&conn) {
                    self.drop_area(id);
                }
                tracing::debug!("client {conn} {why}");
            }
            Role::Worker => {
                if let Some(i) = self.worker_index(conn) {
                    self.workers[i].conn = None;
                    self.worker_lost(i, why);
                }
            }
        }
    }

    /// Gives up a worker: fails its task, reclaims its region and what it
    /// was copying, ends its process; a replacement comes with housekeeping.
    fn worker_lost(&mut self, i: usize, why: &str) {
        let mut w = self.workers.remove(i);
        tracing::warn!("worker {} (pid {}) lost: {why}", w.id, w.pid);
        self.stats.workers_lost += 1;
        if w.state == WState::Starting {
            // Died before it was ready: back off before the next start.
            self.failed_starts += 1;
            let backoff = Duration::from_millis(100u64 << self.failed_starts.min(7)).min(Duration::from_secs(10));
            self.next_spawn = Instant::now() + backoff;
        }
        if w.state == WState::Training {
            if let Some(j) = self.job.as_ref().filter(|j| j.worker == Some(w.id)) {
                // A checkpoint it was writing (the Python worker writes
                // `<file>.tmp<pid>` and renames it).
                let mut tmp = j.checkpoint_path.clone().into_os_string();
                tmp.push(format!(".tmp{}", w.pid));
                let _ = std::fs::remove_file(tmp);
            }
            self.job_lost(w.id, &format!("its worker died ({why})"));
        }
        if let Some(run) = self.running.take_if(|r| r.worker == w.id) {
            self.end_use(run.ticket);
            if run.loading {
                // The region was being written: no longer resident.
                let _ = self.policy.failed(&run.model);
            }
            if let Some(client) = run.client {
                let e = Error::Disconnected(format!("the worker running this request died ({why})"));
                self.reply_error(client, run.request_id, &e);
            }
        }
        if let Some((_, ticket)) = w.model.take() {
            let _ = self.policy.release(ticket);
        }
        if let Some(conn) = w.conn.take() {
            self.conns.remove(&conn);
        }
        if let Some(mut c) = w.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Err(e) = self.space.release(w.region.0) {
            tracing::error!("releasing worker region: {e}");
        }
    }

    fn end_use(&mut self, ticket: Option<Ticket>) {
        if let Some(t) = ticket {
            if let Err(e) = self.policy.release(t) {
                tracing::error!("residency: {e}");
            }
        }
    }

    fn release_model(&mut self, i: usize) {
        if let Some((_, ticket)) = self.workers[i].model.take() {
            if let Err(e) = self.policy.release(ticket) {
                tracing::error!("residency: {e}");
            }
        }
    }

    /// The model's plan: from the cost model fitted and stored with it (the
    /// closed loop of `pipeswitch demo` or the calibration of the library),
    /// else from its profile with default overheads, else one group per layer.
    fn plan_of(&mut self, m: &Model) -> Vec<u32> {
        if let Some(p) = self.plans.get(&m.id) {
            return p.clone();
        }
        let (gbps, overhead_ms) = self.gpu.h2d();
        let plan = pipeswitch::cost::plan_for_stored(&self.store, m, (gbps, overhead_ms));
        let plan: Vec<u32> = plan.into_iter().map(|s| s as u32).collect();
        tracing::info!(
            "model {:?}: {} groups of {} layers (H2D {gbps:.1} GB/s, {overhead_ms:.3} ms per copy{})",
            m.name,
            plan.len(),
            m.layers.len(),
            if self.store.cost(&m.name).ok().flatten().is_some() { "; its fitted cost model" } else { "" }
        );
        self.plans.insert(m.id, plan.clone());
        plan
    }

    /// Starts the next request if the GPU is free.
    fn dispatch(&mut self) {
        if !self.schedule_training() {
            return;
        }
        while self.running.is_none() && !self.stopping {
            let Some(req) = self.queue.pop_front() else { return };
            if let Some(gone) = req.inputs.iter().find_map(|t| match t.data {
                TensorData::Area { area, .. } if !self.areas.contains_key(&area) => Some(area),
                _ => None,
            }) {
                let e = Error::invalid(format!("the request names input area {gone}, which its client replaced while it was queued"));
                self.reply_error(req.client, req.request_id, &e);
                continue;
            }
            let m = match self.store.model(&req.model) {
                Ok(m) => m,
                Err(e) => {
                    self.reply_error(req.client, req.request_id, &e);
                    continue;
                }
            };
            let key = ModelId { name: m.name.clone(), id: m.id };
            match self.start(req, &m, key) {
                Ok(true) => {}
                // Waiting for a standby.
                Ok(false) => return,
                Err(e) => tracing::warn!("request failed to start: {e}"),
            }
        }
    }

    /// Starts `req` on a worker; Ok(false): no worker is free yet (the
    /// request is back at the head of the queue).
    fn start(&mut self, req: Request, m: &Arc<Model>, key: ModelId) -> Result<bool> {
        let queued_ms = req.arrived.elapsed().as_secs_f64() * 1e3;
        // The active worker already serves this model: no switch.
        let active = self.workers.iter().position(|w| w.state == WState::Active && w.model.as_ref().is_some_and(|(k, _)| *k == key));
        let (i, offset, resident, ticket) = match active {
            Some(i) => {
                // A use of its own: counts as a hit and refreshes recency.
                let (ticket, decision) = self.policy.acquire(&key, m.bytes)?;
                let Acquire::Hit { offset, loading: false } = decision else {
                    let _ = self.policy.release(ticket);
                    return Err(Error::Internal(format!("model {:?} is held by its worker but not resident", key.name)));
                };
                (i, offset, true, Some(ticket))
            }
            None => {
                // The worker active on another model steps down (it answers
                // standby once it has cleaned up).
                let others: Vec<usize> = (0..self.workers.len()).filter(|&j| self.workers[j].state == WState::Active).collect();
                for j in others {
                    self.release_model(j);
                    self.workers[j].state = WState::Leaving;
                    self.workers[j].started = Instant::now();
                    if let Some(c) = self.workers[j].conn {
                        self.send_to(c, &Message::Deactivate, None);
                    }
                }
                let Some(i) = self.workers.iter().position(|w| w.state == WState::Standby) else {
                    // No standby yet: wait for one.
                    self.queue.push_front(req);
                    return Ok(false);
                };
                let (ticket, decision) = match self.policy.acquire(&key, m.bytes) {
                    Ok(d) => d,
                    Err(e) => {
                        self.reply_error(req.client, req.request_id, &e);
                        return Err(e);
                    }
                };
                let (offset, resident) = match decision {
                    Acquire::Hit { offset, loading } => (offset, !loading),
                    Acquire::Miss { offset, moves, .. } => {
                        for mv in &moves {
                            let base = self.residency_offset;
                            if let Err(e) = self.gpu.move_bytes(base + mv.from, base + mv.to, mv.bytes) {
                                // A failed move leaves that model untrustworthy.
                                let _ = self.policy.failed(&mv.model);
                                let _ = self.policy.failed(&key);
                                let _ = self.policy.release(ticket);
                                self.reply_error(req.client, req.request_id, &e);
                                return Err(e);
                            }
                        }
                        self.stats.bytes_copied += m.bytes;
                        (offset, false)
                    }
                };
                // The worker holds the model while it stays active on it.
                self.workers[i].model = Some((key.clone(), ticket));
                self.workers[i].state = WState::Active;
                (i, offset, resident, None)
            }
        };
        let task_id = self.next_task;
        self.next_task += 1;
        let task = Task {
            task_id,
            kind: TaskKind::Inference,
            model: m.name.clone(),
            model_id: m.id,
            region_offset: self.residency_offset + offset,
            resident,
            plan: if resident { vec![0] } else { self.plan_of(m) },
            inputs: req.inputs,
            decided_ns: monotonic_ns(),
        };
        let conn = self.workers[i].conn.expect("standby and active workers are connected");
        self.running = Some(Running {
            task_id,
            ticket,
            worker: self.workers[i].id,
            client: Some(req.client),
            request_id: req.request_id,
            model: key,
            loading: !resident,
            arrived: req.arrived,
            queued_ms,
        });
        if !self.send_to(conn, &Message::Activate(task), req.file.as_ref()) {
            self.worker_lost(i, "could not be activated");
        }
        Ok(true)
    }

    /// A client gives its input area (`file`, `bytes`): checked, recorded
    /// as the client's (replacing its earlier one), passed to every worker.
    fn input_area(&mut self, conn: ConnId, request_id: u64, bytes: u64, file: Option<OwnedFd>) {
        let Some(file) = file else {
            return self.refuse(conn, request_id, &Error::Protocol("an input area came without its file".into()));
        };
        if let Err(e) = area::check_file(file.as_fd(), bytes) {
            return self.refuse(conn, request_id, &e);
        }
        if bytes > self.cfg.max_input_area {
            let e = Error::Refused(format!("an input area of {bytes} bytes exceeds this daemon's limit of {} per client", self.cfg.max_input_area));
            return self.refuse(conn, request_id, &e);
        }
        let old = self.client_area.get(&conn).copied();
        let others: u64 = self.areas.iter().filter(|(id, _)| Some(**id) != old).map(|(_, a)| a.bytes).sum();
        if others + bytes > self.cfg.input_areas_bytes {
            let e = Error::Refused(format!(
                "an input area of {bytes} bytes does not fit: {others} of the {} bytes for all clients' areas are taken",
                self.cfg.input_areas_bytes
            ));
            return self.refuse(conn, request_id, &e);
        }
        if let Some(old) = old {
            self.drop_area(old);
        }
        let id = self.next_area;
        self.next_area += 1;
        self.areas.insert(id, AreaRec { bytes, file });
        self.client_area.insert(conn, id);
        tracing::debug!("client {conn}: input area {id} of {bytes} bytes");
        let conns: Vec<ConnId> = self.workers.iter().filter_map(|w| w.conn).collect();
        for c in conns {
            if !self.send_area(c, id) {
                if let Some(i) = self.worker_index(c) {
                    self.worker_lost(i, "could not be given an input area");
                }
            }
        }
        self.send_to(conn, &Message::InputAreaReady { request_id, area: id, bytes }, None);
    }

    /// An error answer that is no failed request (a refused area).
    fn refuse(&mut self, conn: ConnId, request_id: u64, e: &Error) {
        let _ = self.send_to(conn, &Message::Error { request_id, status: status_of(e), message: e.to_string() }, None);
    }

    /// Sends area `id` to the worker on `conn`.
    fn send_area(&mut self, conn: ConnId, id: u64) -> bool {
        let Some(a) = self.areas.get(&id) else { return true };
        let (bytes, file) = match a.file.try_clone() {
            Ok(f) => (a.bytes, f),
            Err(e) => {
                tracing::error!("duplicating input area {id}: {e}");
                return false;
            }
        };
        self.send_to(conn, &Message::AreaAdd { area: id, bytes }, Some(&file))
    }

    /// Forgets area `id` and tells every worker to drop it (after any task
    /// that names it: messages to a worker go in order).
    fn drop_area(&mut self, id: u64) {
        if self.areas.remove(&id).is_none() {
            return;
        }
        tracing::debug!("input area {id} dropped");
        let conns: Vec<ConnId> = self.workers.iter().filter_map(|w| w.conn).collect();
        for c in conns {
            self.send_to(c, &Message::AreaDrop { area: id }, None);
        }
    }

    /// A request's tensors in input areas must name the client's current
    /// area and lie inside it.
    fn check_area_tensors(&self, conn: ConnId, inputs: &[Tensor]) -> Result<()> {
        for t in inputs {
            let TensorData::Area { area, offset, bytes } = t.data else { continue };
            let Some(mine) = self.client_area.get(&conn).filter(|&&id| id == area) else {
                return Err(Error::invalid(format!("input {:?} names input area {area}, which is not this client's", t.name)));
            };
            let size = self.areas.get(mine).map_or(0, |a| a.bytes);
            if offset.checked_add(bytes).is_none_or(|end| end > size) {
                return Err(Error::invalid(format!("input {:?}: [{offset}, +{bytes}) lies outside the {size}-byte input area", t.name)));
            }
        }
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn train_submit(&mut self, conn: ConnId, request_id: u64, job: TrainJob) {
        if let Err(e) = job.validate() {
            return self.reply_error(conn, request_id, &e);
        }
        if self.cfg.single_worker || self.cfg.process_per_task {
            return self.reply_error(conn, request_id, &Error::Refused("training needs a daemon with standby workers (not an ablation mode)".into()));
        }
        if self.stopping {
            return self.reply_error(conn, request_id, &Error::Refused("the daemon is stopping".into()));
        }
        if let Some(j) = self.job.as_ref().filter(|j| !j.terminal()) {
            let e = Error::Refused(format!("training job {} ({:?}) has not ended: one job at a time", j.id, j.job.name));
            return self.reply_error(conn, request_id, &e);
        }
        let connected: Vec<&WorkerRec> = self.workers.iter().filter(|w| w.conn.is_some()).collect();
        if !connected.is_empty() && connected.iter().all(|w| w.kind == BUILTIN_KIND) {
            let e = Error::Refused(
                "this daemon's workers are the built-in PTX worker, which runs inference only: start the daemon with \
                 --worker-cmd python3 -m pipeswitch.worker ... to train"
                    .into(),
            );
            return self.reply_error(conn, request_id, &e);
        }
        let id = self.next_job;
        // Daemons of one process (tests) each name their own files.
        static DAEMONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nonce = *self.nonce.get_or_insert_with(|| DAEMONS.fetch_add(1, Ordering::Relaxed));
        let name = format!("train-{}-{nonce}-gpu{}-{id}", std::process::id(), self.cfg.device);
        let path = match pipeswitch::store::shm::path_of(&name) {
            Ok(p) => p,
            Err(e) => return self.reply_error(conn, request_id, &e),
        };
        if let Some(old) = self.job.take() {
            let _ = std::fs::remove_file(&old.checkpoint_path);
        }
        self.next_job += 1;
        let sched = Scheduler::new(&job, self.now_ms());
        tracing::info!("training job {id} ({:?}, {}) accepted", job.name, job.entry);
        let rec = JobRec {
            id,
            job,
            state: JobState::Waiting,
            worker: None,
            task_id: 0,
            iteration: 0,
            checkpoint: 0,
            preemptions: 0,
            restarts: 0,
            status: 0,
            message: String::new(),
            sched,
            checkpoint_path: path,
            stop_sent: None,
            cancel: false,
            state_bytes: 0,
            reserved: None,
            saving: SaveMode::Host,
            writing_back: false,
        };
        let reply = rec.status_msg(request_id);
        self.job = Some(rec);
        self.send_to(conn, &reply, None);
    }

    fn train_query(&mut self, conn: ConnId, request_id: u64, job_id: u64, cancel: bool) {
        let Some(j) = self.job.as_mut().filter(|j| j.id == job_id) else {
            return self.reply_error(conn, request_id, &Error::NotFound(format!("no training job {job_id}")));
        };
        if cancel && !j.terminal() {
            j.cancel = true;
            match j.state {
                JobState::Waiting | JobState::Paused => self.end_job(JobState::Cancelled, 0, String::new()),
                // Running: stopped by the next scheduling round; preempting:
                // ended when it has stopped.
                _ => {}
            }
        }
        let reply = self.job.as_ref().expect("checked").status_msg(request_id);
        self.send_to(conn, &reply, None);
    }

    /// Ends the job: its worker drops the state (and answers standby).
    fn end_job(&mut self, state: JobState, status: u32, message: String) {
        self.release_state();
        let Some(j) = self.job.as_mut() else { return };
        tracing::info!("training job {} {:?} after {} iterations{}", j.id, state, j.iteration, if message.is_empty() { String::new() } else { format!(": {message}") });
        j.state = state;
        j.status = status;
        j.message = message;
        let _ = std::fs::remove_file(&j.checkpoint_path);
        if let Some(wid) = j.worker.take() {
            if let Some(i) = self.workers.iter().position(|w| w.id == wid) {
                self.workers[i].state = WState::Leaving;
                self.workers[i].started = Instant::now();
                if let Some(c) = self.workers[i].conn {
                    self.send_to(c, &Message::Deactivate, None);
                }
            }
        }
    }

    /// The job's worker (`wid`) is gone or lost its state: the job resumes
    /// from its checkpoint on another worker, or fails.
    fn job_lost(&mut self, wid: u32, why: &str) {
        if !self.job.as_ref().is_some_and(|j| j.worker == Some(wid) && !j.terminal()) {
            return;
        }
        // The state on the GPU went with the worker.
        self.release_state();
        let Some(j) = self.job.as_mut() else { return };
        j.worker = None;
        j.writing_back = false;
        if j.cancel {
            j.state = JobState::Cancelled;
            let _ = std::fs::remove_file(&j.checkpoint_path);
            return;
        }
        if j.checkpoint > 0 && j.restarts < MAX_TRAIN_RESTARTS {
            j.restarts += 1;
            tracing::warn!("training job {}: {why}; resuming from its checkpoint of iteration {} (iteration {} was reached)", j.id, j.checkpoint, j.iteration);
            j.iteration = j.checkpoint;
            j.state = JobState::Waiting;
            j.stop_sent = None;
            let now = self.epoch.elapsed().as_millis() as u64;
            j.sched.stopped(now);
        } else {
            let why = if j.checkpoint == 0 {
                format!("training job {} failed: {why}, and no checkpoint survives (set checkpoint_every to resume from one)", j.id)
            } else {
                format!("training job {} failed: {why}, after {} restarts", j.id, j.restarts)
            };
            j.state = JobState::Failed;
            j.status = status_of(&Error::Disconnected(String::new()));
            j.message = why;
            let _ = std::fs::remove_file(&j.checkpoint_path);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn train_stopped(&mut self, conn: ConnId, task_id: u64, reason: StopReason, iteration: u64, checkpoint: u64, status: u32, message: String, stop_ms: f64, save_ms: f64) {
        let Some(i) = self.worker_index(conn) else { return };
        let wid = self.workers[i].id;
        let now = self.now_ms();
        let Some(j) = self.job.as_mut().filter(|j| j.task_id == task_id && j.worker == Some(wid)) else {
            tracing::warn!("worker {wid} stopped training task {task_id}, which it was not running");
            return;
        };
        j.iteration = iteration;
        j.checkpoint = j.checkpoint.max(checkpoint);
        j.stop_sent = None;
        if !std::mem::take(&mut j.writing_back) {
            j.sched.stopped(now);
        }
        match reason {
            StopReason::Preempted => {
                tracing::info!("training job {} stopped at iteration {iteration}: stop {stop_ms:.2} ms, save {save_ms:.2} ms ({:?})", j.id, j.saving);
                j.state = JobState::Paused;
                if j.saving != SaveMode::Resident {
                    // The state left the GPU: its room is the models' again.
                    self.release_state();
                }
                let j = self.job.as_mut().expect("checked");
                if j.cancel {
                    self.end_job(JobState::Cancelled, 0, String::new());
                }
            }
            StopReason::Finished => self.end_job(JobState::Finished, 0, String::new()),
            StopReason::Failed => {
                let status = if status == 0 { status_of(&Error::Internal(String::new())) } else { status };
                self.end_job(JobState::Failed, status, message);
            }
        }
    }

    /// Applies the training policy: preempts or resumes the job; false if
    /// queued inference must wait.
    fn schedule_training(&mut self) -> bool {
        let now = self.now_ms();
        let queued = !self.queue.is_empty();
        let inferring = self.running.is_some();
        let stopping = self.stopping;
        let Some(j) = self.job.as_mut() else { return true };
        let training = match j.state {
            JobState::Running => Training::Running,
            JobState::Preempting => Training::Stopping,
            JobState::Paused | JobState::Waiting => Training::Paused,
            _ => return true,
        };
        let mut d = j.sched.decide(now, training, queued, inferring);
        if j.cancel && training == Training::Running {
            d.preempt = true;
        }
        // A job paused with its state resident, and a queued request whose
        // model needs the room the state holds: the state is written back
        // first (the request waits, as it would for a preemption).
        let write_back = training == Training::Paused && j.reserved.is_some() && j.worker.is_some() && d.dispatch && !j.cancel;
        if write_back && self.auto_save() == SaveMode::Host {
            let j = self.job.as_mut().expect("checked");
            let Some(i) = self.workers.iter().position(|w| Some(w.id) == j.worker) else { return false };
            tracing::info!("training job {}: a request needs the room its paused state holds; writing the state back", j.id);
            j.state = JobState::Preempting;
            j.stop_sent = Some(Instant::now());
            j.saving = SaveMode::Host;
            j.writing_back = true;
            let msg = Message::Preempt { task_id: j.task_id, mode: j.job.preempt, save: SaveMode::Host, decided_ns: monotonic_ns() };
            if let Some(c) = self.workers[i].conn {
                if !self.send_to(c, &msg, None) {
                    self.worker_lost(i, "could not be asked to write its state back");
                }
            }
            return false;
        }
        let j = self.job.as_mut().expect("checked");
        if d.preempt {
            let save = match j.job.save {
                SaveMode::Auto => self.auto_save(),
                s => s,
            };
            let j = self.job.as_mut().expect("checked");
            let Some(i) = self.workers.iter().position(|w| Some(w.id) == j.worker) else { return false };
            j.state = JobState::Preempting;
            j.stop_sent = Some(Instant::now());
            j.preemptions += 1;
            j.saving = save;
            let msg = Message::Preempt { task_id: j.task_id, mode: j.job.preempt, save, decided_ns: monotonic_ns() };
            if let Some(c) = self.workers[i].conn {
                if !self.send_to(c, &msg, None) {
                    self.worker_lost(i, "could not be preempted");
                }
            }
            return false;
        }
        if d.resume && !inferring && !stopping && !j.cancel {
            // The worker holding the state, else a standby (from the checkpoint).
            let holder = j.worker.and_then(|wid| self.workers.iter().position(|w| w.id == wid));
            let (i, resume) = match holder {
                Some(i) => (i, j.iteration),
                None => match self.workers.iter().position(|w| w.state == WState::Standby && w.can_train()) {
                    Some(i) => (i, j.checkpoint.min(j.iteration)),
                    None => {
                        // An idle worker active on a model steps down for the job.
                        if let Some(k) = self.workers.iter().position(|w| w.state == WState::Active && w.can_train()) {
                            self.release_model(k);
                            self.workers[k].state = WState::Leaving;
                            self.workers[k].started = Instant::now();
                            if let Some(c) = self.workers[k].conn {
                                self.send_to(c, &Message::Deactivate, None);
                            }
                        }
                        return d.dispatch;
                    }
                },
            };
            let task_id = self.next_task;
            self.next_task += 1;
            j.task_id = task_id;
            j.worker = Some(self.workers[i].id);
            j.state = JobState::Running;
            j.sched.started(now);
            self.workers[i].state = WState::Training;
            let task = TrainTask {
                task_id,
                job_id: j.id,
                job: j.job.clone(),
                checkpoint_path: j.checkpoint_path.to_string_lossy().into_owned(),
                resume_iteration: resume,
                decided_ns: monotonic_ns(),
            };
            if let Some(c) = self.workers[i].conn {
                if !self.send_to(c, &Message::TrainStart(task), None) {
                    self.worker_lost(i, "could not start training");
                }
            }
            return false;
        }
        d.dispatch
    }

    /// `SaveMode::Auto`: accounts the job's state (its reported bytes) in
    /// the residency policy as a held reservation, evicting unused models
    /// for it as a miss would; idle workers active on a model step down if
    /// that makes the room (training has the GPU now). If it cannot be
    /// placed (the area is too small, or models in use split it), it stays
    /// unaccounted and the next preemption writes it back.
    fn reserve_state(&mut self) {
        let Some(j) = self.job.as_mut().filter(|j| j.job.save == SaveMode::Auto && !j.terminal() && j.state_bytes > 0) else { return };
        match j.reserved {
            Some((_, b)) if b == j.state_bytes => return,
            Some(_) => self.release_state(), // its size changed: accounted again
            None => {}
        }
        let bytes = self.job.as_ref().map_or(0, |j| j.state_bytes);
        if !self.policy.fits(bytes, &[]) {
            let busy = self.running.as_ref().map(|r| r.worker);
            let idle: Vec<usize> =
                (0..self.workers.len()).filter(|&k| self.workers[k].state == WState::Active && Some(self.workers[k].id) != busy).collect();
            let keys: Vec<ModelId> = idle.iter().filter_map(|&k| self.workers[k].model.as_ref().map(|(m, _)| m.clone())).collect();
            if self.policy.fits(bytes, &keys) {
                for k in idle {
                    self.release_model(k);
                    self.workers[k].state = WState::Leaving;
                    self.workers[k].started = Instant::now();
                    if let Some(c) = self.workers[k].conn {
                        self.send_to(c, &Message::Deactivate, None);
                    }
                }
            }
        }
        let j = self.job.as_mut().expect("checked");
        let key = ModelId::training_state(j.id);
        match self.policy.reserve(&key, j.state_bytes) {
            Ok((ticket, _, evicted, moves)) => {
                j.reserved = Some((ticket, j.state_bytes));
                tracing::info!("training job {}: its state ({} bytes) is accounted in the residency area; evicted {evicted:?}", j.id, j.state_bytes);
                for mv in &moves {
                    let base = self.residency_offset;
                    if let Err(e) = self.gpu.move_bytes(base + mv.from, base + mv.to, mv.bytes) {
                        tracing::warn!("residency: moving {:?} for the training state failed: {e}", mv.model);
                        let _ = self.policy.failed(&mv.model);
                    }
                }
            }
            Err(e) => tracing::info!("training job {}: its state stays unaccounted and is written back when preempted: {e}", j.id),
        }
    }

    /// Releases the reservation of the job's state (it left the GPU, or
    /// the job ended).
    fn release_state(&mut self) {
        let Some(j) = self.job.as_mut() else { return };
        let Some((ticket, _)) = j.reserved.take() else { return };
        let key = ModelId::training_state(j.id);
        if let Err(e) = self.policy.release(ticket).and_then(|_| self.policy.forget(&key)) {
            tracing::error!("residency: {e}");
        }
    }

    /// `SaveMode::Auto`'s decision at a preemption: resident if the state
    /// is accounted and every queued request's model that is not placed
    /// fits beside it (models in use stay, the active workers' step down),
    /// else written back to host memory.
    fn auto_save(&self) -> SaveMode {
        let Some(j) = self.job.as_ref().filter(|j| j.reserved.is_some()) else { return SaveMode::Host };
        let mut let_go: Vec<ModelId> =
            self.workers.iter().filter(|w| w.state == WState::Active).filter_map(|w| w.model.as_ref().map(|(k, _)| k.clone())).collect();
        let n = let_go.len();
        for r in &self.queue {
            let Ok(m) = self.store.model(&r.model) else { continue };
            let key = ModelId { name: m.name.clone(), id: m.id };
            if self.policy.offset(&key).is_some() {
                continue;
            }
            let_go.truncate(n);
            if self.policy.fits(m.bytes, &let_go) {
                continue;
            }
            let_go.push(ModelId::training_state(j.id));
            if self.policy.fits(m.bytes, &let_go) {
                return SaveMode::Host;
            }
        }
        SaveMode::Resident
    }

    fn shutdown(&mut self, rx: &Receiver<Event>) {
        self.stopping = true;
        for r in std::mem::take(&mut self.queue) {
            self.reply_error(r.client, r.request_id, &Error::Refused("the daemon is stopping".into()));
        }
        if let Some(run) = self.running.take() {
            self.end_use(run.ticket);
            if let Some(c) = run.client {
                self.reply_error(c, run.request_id, &Error::Disconnected("the daemon stopped".into()));
            }
        }
        let conns: Vec<ConnId> = self.workers.iter().filter_map(|w| w.conn).collect();
        for c in conns {
            self.send_to(c, &Message::Shutdown, None);
        }
        // Give workers a moment to leave on their own, then end them.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && self.workers.iter().any(|w| w.child.is_some()) {
            while let Ok(ev) = rx.try_recv() {
                if let Event::Left { conn, .. } = ev {
                    self.conns.remove(&conn);
                }
            }
            for w in &mut self.workers {
                if let Some(c) = w.child.as_mut() {
                    if let Ok(Some(_)) = c.try_wait() {
                        w.child = None;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for w in &mut self.workers {
            if let Some(mut c) = w.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for mut c in self.exiting.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(j) = self.job.take() {
            let _ = std::fs::remove_file(&j.checkpoint_path);
        }
        tracing::info!("stopped");
    }
}

/// The daemon's GPU: an arena on `device` exported to the workers.
pub struct CudaGpu {
    arena: Arc<pipeswitch::arena::Arena>,
    handle: Vec<u8>,
    stream: pipeswitch::cuda::Stream,
    h2d: (f64, f64),
}

impl CudaGpu {
    /// Allocates an arena of `bytes` on `device` (no workspace: the daemon
    /// carves the worker regions itself) and measures H2D for plans.
    pub fn new(device: i32, bytes: u64) -> Result<CudaGpu> {
        let arena = Arc::new(pipeswitch::arena::Arena::create(device, bytes, 0)?);
        let handle = arena.export()?.to_bytes().to_vec();
        let stream = pipeswitch::cuda::Stream::new(arena.device())?;
        let p = pipeswitch::measure::measure_h2d(device, 256 << 20, 5)?;
        Ok(CudaGpu { arena, handle, stream, h2d: (p.peak_gbps, p.overhead_ms) })
    }
}

impl Gpu for CudaGpu {
    fn device(&self) -> i32 {
        self.arena.device().ordinal()
    }
    fn arena_handle(&self) -> Vec<u8> {
        self.handle.clone()
    }
    fn model_space(&self) -> u64 {
        self.arena.workspace().0
    }
    fn move_bytes(&mut self, from: u64, to: u64, bytes: u64) -> Result<()> {
        self.arena.device().bind()?;
        self.arena.move_bytes(from, to, bytes, self.stream.raw())?;
        self.stream.synchronize()
    }
    fn h2d(&self) -> (f64, f64) {
        self.h2d
    }
}
