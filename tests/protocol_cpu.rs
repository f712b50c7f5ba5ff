//! The daemon protocol without a GPU: every message round-trips, damaged and
//! hostile frames are refused with errors (never a panic or a huge
//! allocation), and frames cross a real socket pair with tensor files.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use pipeswitch::error::Error;
use pipeswitch::protocol::io::{pack_tensors, recv, send, unpack_tensors, TensorRef, TensorViews};
use pipeswitch::protocol::{
    decode_frame, encode_frame, Header, JobState, Message, PreemptMode, Progress, Role, SaveMode, SharePolicy, Stats, StopReason,
    Task, TaskKind, Tensor, TensorData, Timing, TrainJob, TrainTask, HEADER_BYTES, INLINE_LIMIT, MAX_BODY, VERSION,
};

fn tensor(name: &str, n: usize) -> Tensor {
    Tensor { name: name.into(), dtype: 11, shape: vec![1, n as u64 / 4], data: TensorData::Inline((0..n).map(|i| i as u8).collect()) }
}

fn every_message() -> Vec<Message> {
    let timing = Timing { queued_ms: 0.5, activation_ms: 0.25, worker_ms: 9.75, total_ms: 10.5 };
    vec![
        Message::Hello { role: Role::Client, pid: 42, worker_kind: String::new() },
        Message::Hello { role: Role::Worker, pid: 7, worker_kind: "builtin".into() },
        Message::Welcome {
            daemon_pid: 1,
            device: 0,
            store: "models".into(),
            worker_id: 3,
            arena_handle: vec![9; 128],
            activation_offset: 1 << 30,
            activation_bytes: 64 << 20,
        },
        Message::Welcome {
            daemon_pid: 1,
            device: 0,
            store: "s".into(),
            worker_id: 0,
            arena_handle: vec![],
            activation_offset: 0,
            activation_bytes: 0,
        },
        Message::Error { request_id: 5, status: 200, message: "no model named \"x\"".into() },
        Message::Infer { request_id: 9, model: "bert".into(), inputs: vec![tensor("input_ids", 64), tensor("mask", 0)] },
        Message::Infer {
            request_id: 10,
            model: "gpt2".into(),
            inputs: vec![Tensor { name: "big".into(), dtype: 9, shape: vec![8, 1024], data: TensorData::Shared { offset: 4096, bytes: 32768 } }],
        },
        Message::InferResult { request_id: 9, outputs: vec![tensor("out", 128)], timing },
        Message::Standby { worker_id: 3 },
        Message::Activate(Task {
            task_id: 77,
            kind: TaskKind::Inference,
            model: "resnet152".into(),
            model_id: 12,
            region_offset: 256 << 20,
            resident: false,
            plan: vec![0, 4, 40, 150],
            inputs: vec![tensor("images", 16)],
            decided_ns: 123_456_789,
        }),
        Message::TaskDone { task_id: 77, status: 0, message: String::new(), outputs: vec![tensor("logits", 40)], timing },
        Message::TaskDone { task_id: 78, status: 302, message: "CUDA error".into(), outputs: vec![], timing: Timing::default() },
        Message::StatsRequest,
        Message::StatsReply(Stats {
            requests: 10,
            failed: 1,
            hits: 6,
            misses: 4,
            evictions: 2,
            bytes_copied: 1 << 30,
            workers: 3,
            standbys: 2,
            workers_started: 4,
            workers_lost: 1,
        }),
        Message::Shutdown,
        Message::Deactivate,
        Message::TrainSubmit { request_id: 3, job: job() },
        Message::TrainStatus {
            request_id: 3,
            job_id: 1,
            state: JobState::Paused,
            iteration: 120,
            checkpoint: 100,
            preemptions: 4,
            status: 0,
            message: String::new(),
        },
        Message::TrainStatus {
            request_id: 4,
            job_id: 1,
            state: JobState::Failed,
            iteration: 7,
            checkpoint: 0,
            preemptions: 0,
            status: 901,
            message: "ValueError: bad batch".into(),
        },
        Message::TrainQuery { request_id: 5, job_id: 1, cancel: true },
        Message::TrainStart(TrainTask {
            task_id: 80,
            job_id: 1,
            job: TrainJob { policy: SharePolicy::InferenceFirst, preempt: PreemptMode::Boundary, save: SaveMode::Resident, ..job() },
            checkpoint_path: "/dev/shm/pipeswitch-train-1".into(),
            resume_iteration: 100,
            decided_ns: 987_654_321,
        }),
        Message::Preempt { task_id: 80, mode: PreemptMode::Abandon, save: SaveMode::Host, decided_ns: 55 },
        Message::TrainProgress { task_id: 80, event: Progress::Checkpoint, iteration: 110, checkpoint: 110, state_bytes: 480 << 20 },
        Message::TrainStopped {
            task_id: 80,
            reason: StopReason::Preempted,
            iteration: 111,
            checkpoint: 110,
            status: 0,
            message: String::new(),
            stop_ms: 1.5,
            save_ms: 12.25,
        },
        // Appended: the save mode the daemon decides (the frames above keep their names).
        Message::TrainSubmit { request_id: 6, job: TrainJob { save: SaveMode::Auto, ..job() } },
        // Appended: input areas.
        Message::InputArea { request_id: 11, bytes: 32 << 20 },
        Message::InputAreaReady { request_id: 11, area: 3, bytes: 32 << 20 },
        Message::AreaAdd { area: 3, bytes: 32 << 20 },
        Message::AreaDrop { area: 3 },
        Message::Infer {
            request_id: 12,
            model: "resnet152".into(),
            inputs: vec![
                Tensor { name: "images".into(), dtype: 11, shape: vec![8, 3, 224, 224], data: TensorData::Area { area: 3, offset: 0, bytes: 4_816_896 } },
                tensor("scale", 4),
            ],
        },
    ]
}

fn job() -> TrainJob {
    TrainJob {
        name: "resnet152-train".into(),
        entry: "pipeswitch.train:resnet152_job".into(),
        preempt: PreemptMode::Abandon,
        save: SaveMode::Host,
        policy: SharePolicy::TimeShare,
        share: 0.75,
        period_ms: 5000,
        idle_ms: 200,
        iterations: 1000,
        checkpoint_every: 50,
    }
}

#[test]
fn training_jobs_are_checked() {
    assert!(job().validate().is_ok());
    for (bad, what) in [
        (TrainJob { entry: "nomodule".into(), ..job() }, "module:function"),
        (TrainJob { entry: ":f".into(), ..job() }, "module:function"),
        (TrainJob { name: String::new(), ..job() }, "no name"),
        (TrainJob { share: 1.0, ..job() }, "not in (0, 1)"),
        (TrainJob { share: f64::NAN, ..job() }, "not in (0, 1)"),
        (TrainJob { period_ms: 0, ..job() }, "period"),
    ] {
        let e = bad.validate().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains(what), "{e}");
    }
    // Inference first ignores the share.
    assert!(TrainJob { policy: SharePolicy::InferenceFirst, share: 0.0, ..job() }.validate().is_ok());
    // New jobs let the daemon decide where a preempted state waits.
    let j = TrainJob::new("j", "m:f");
    assert_eq!((j.save, j.preempt, j.policy, j.idle_ms), (SaveMode::Auto, PreemptMode::Abandon, SharePolicy::InferenceFirst, 100));
    assert!(j.validate().is_ok());
    // Save mode 3 is auto on the wire; 4 is no mode.
    let mut body = Message::TrainSubmit { request_id: 1, job: j }.encode_body();
    let at = 8 + 4 + 1 + 4 + 3 + 1; // request id, name "j", entry "m:f", preempt
    assert_eq!(body[at], 3);
    body[at] = 4;
    let e = Message::decode_body(13, &body).unwrap_err();
    assert!(e.to_string().contains("unknown save mode 4"), "{e}");
}

#[test]
fn every_message_round_trips() {
    for m in every_message() {
        let frame = encode_frame(&m, 0).unwrap();
        let (h, back) = decode_frame(&frame).unwrap();
        assert_eq!(back, m);
        assert_eq!(h.kind, m.kind());
        assert_eq!(h.body_len as usize, frame.len() - HEADER_BYTES);
    }
}

#[test]
fn every_truncation_and_extension_is_an_error() {
    for m in every_message() {
        let frame = encode_frame(&m, 0).unwrap();
        let body = &frame[HEADER_BYTES..];
        for cut in 0..body.len() {
            let r = Message::decode_body(m.kind(), &body[..cut]);
            assert!(matches!(r, Err(Error::Protocol(_))), "{m:?} cut at {cut}: {r:?}");
        }
        let mut longer = body.to_vec();
        longer.push(0);
        assert!(matches!(Message::decode_body(m.kind(), &longer), Err(Error::Protocol(_))));
        // The frame's announced length must match.
        assert!(decode_frame(&frame[..frame.len() - 1]).is_err() || body.is_empty());
    }
}

#[test]
fn hostile_headers_and_lengths_are_refused() {
    let ok = Header { kind: 4, body_len: 10, fds: 0 }.encode();
    let mut bad = ok;
    bad[0] = b'X';
    assert!(Header::decode(&bad).unwrap_err().to_string().contains("magic"));
    let mut bad = ok;
    bad[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
    let e = Header::decode(&bad).unwrap_err().to_string();
    assert!(e.contains(&format!("version {}", VERSION + 1)) && e.contains(&format!("version {VERSION}")), "{e}");
    let mut bad = ok;
    bad[8..12].copy_from_slice(&(MAX_BODY as u32 + 1).to_le_bytes());
    assert!(Header::decode(&bad).unwrap_err().to_string().contains("exceeds"));
    let mut bad = ok;
    bad[12..16].copy_from_slice(&2u32.to_le_bytes());
    assert!(Header::decode(&bad).is_err());
    assert!(Message::decode_body(999, &[]).unwrap_err().to_string().contains("unknown message kind"));
    // A list that claims 2^32-1 tensors in a 20-byte body.
    let mut body = 9u64.to_le_bytes().to_vec();
    body.extend_from_slice(&1u32.to_le_bytes());
    body.push(b'm');
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = Message::decode_body(4, &body).unwrap_err().to_string();
    assert!(e.contains("do not fit"), "{e}");
    // A string that claims more bytes than the body has.
    let mut body = 9u64.to_le_bytes().to_vec();
    body.extend_from_slice(&(1u32 << 30).to_le_bytes());
    assert!(Message::decode_body(4, &body).is_err());
    // Too many dimensions, bad booleans, bad roles, shared ranges that overflow.
    let mut t = tensor("x", 4);
    t.shape = vec![1; 9];
    let f = encode_frame(&Message::Infer { request_id: 1, model: "m".into(), inputs: vec![t] }, 0).unwrap();
    assert!(decode_frame(&f).unwrap_err().to_string().contains("dimensions"));
    let t = Tensor { name: "x".into(), dtype: 1, shape: vec![], data: TensorData::Shared { offset: u64::MAX, bytes: 2 } };
    let f = encode_frame(&Message::Infer { request_id: 1, model: "m".into(), inputs: vec![t] }, 0).unwrap();
    assert!(decode_frame(&f).is_err());
    let mut f = encode_frame(&Message::Hello { role: Role::Client, pid: 1, worker_kind: String::new() }, 0).unwrap();
    f[HEADER_BYTES] = 9;
    assert!(decode_frame(&f).unwrap_err().to_string().contains("role"));
    // A message too large to send inline is refused before sending.
    let huge = Message::Infer { request_id: 1, model: "m".into(), inputs: vec![tensor("x", MAX_BODY)] };
    assert!(matches!(encode_frame(&huge, 0), Err(Error::InvalidArgument(_))));
}

#[test]
fn frames_and_tensor_files_cross_a_socket() {
    let (a, b) = UnixStream::pair().unwrap();
    let small: Vec<u8> = (0..100u8).collect();
    let large: Vec<u8> = (0..(3 * INLINE_LIMIT + 5)).map(|i| (i * 7 % 251) as u8).collect();
    let large2: Vec<u8> = (0..(INLINE_LIMIT + 1)).map(|i| (i % 13) as u8).collect();
    let refs = [
        TensorRef { name: "small", dtype: 1, shape: &[100], data: &small },
        TensorRef { name: "large", dtype: 1, shape: &[large.len() as u64], data: &large },
        TensorRef { name: "large2", dtype: 1, shape: &[large2.len() as u64], data: &large2 },
    ];
    let (tensors, file) = pack_tensors(&refs).unwrap();
    assert!(matches!(tensors[0].data, TensorData::Inline(_)));
    assert!(matches!(tensors[1].data, TensorData::Shared { .. }));
    let msg = Message::Infer { request_id: 3, model: "m".into(), inputs: tensors };
    send(&a, &msg, file.as_ref().map(|f| f.as_fd())).unwrap();
    drop(file);
    send(&a, &Message::StatsRequest, None).unwrap();
    let (got, file) = recv(&b).unwrap().unwrap();
    assert!(file.is_some());
    let Message::Infer { inputs, .. } = got else { panic!("{got:?}") };
    let unpacked = unpack_tensors(inputs, file.as_ref()).unwrap();
    assert_eq!(unpacked[0].1, small);
    assert_eq!(unpacked[1].1, large);
    assert_eq!(unpacked[2].1, large2);
    let (got, file) = recv(&b).unwrap().unwrap();
    assert_eq!(got, Message::StatsRequest);
    assert!(file.is_none());
    // A clean close between frames is None; in the middle of one, an error.
    drop(a);
    assert!(recv(&b).unwrap().is_none());
    let (mut a, b) = UnixStream::pair().unwrap();
    let frame = encode_frame(&Message::Standby { worker_id: 1 }, 0).unwrap();
    a.write_all(&frame[..frame.len() - 2]).unwrap();
    drop(a);
    assert!(matches!(recv(&b), Err(Error::Protocol(_))));
    // Sending to a peer that left is an error, not SIGPIPE.
    let (a, b) = UnixStream::pair().unwrap();
    drop(b);
    assert!(matches!(send(&a, &Message::Shutdown, None), Err(Error::Disconnected(_))));
}

#[test]
fn files_must_match_what_the_frame_announces() {
    // Announced, not sent.
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(&encode_frame(&Message::Shutdown, 1).unwrap()).unwrap();
    assert!(recv(&b).unwrap_err().to_string().contains("did not come"));
    // Sent, not announced: the raw frame says 0 files.
    let (a, b) = UnixStream::pair().unwrap();
    let (_, file) = pack_tensors(&[TensorRef { name: "x", dtype: 1, shape: &[], data: &vec![1u8; INLINE_LIMIT + 1] }]).unwrap();
    let frame = encode_frame(&Message::Shutdown, 0).unwrap();
    {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::io::IoSlice;
        use std::os::fd::AsRawFd;
        let fds = [file.as_ref().unwrap().as_raw_fd()];
        sendmsg::<()>(a.as_raw_fd(), &[IoSlice::new(&frame)], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).unwrap();
    }
    assert!(recv(&b).unwrap_err().to_string().contains("announced none"));
    // Tensor ranges beyond the file.
    let t = Tensor { name: "x".into(), dtype: 1, shape: vec![], data: TensorData::Shared { offset: 0, bytes: (INLINE_LIMIT + 2) as u64 } };
    assert!(unpack_tensors(vec![t.clone()], file.as_ref()).unwrap_err().to_string().contains("claims"));
    assert!(unpack_tensors(vec![t], None).unwrap_err().to_string().contains("did not come"));
}

/// The frames of `every_message()` as files that the Python protocol
/// (python/pipeswitch/protocol.py) decodes and re-encodes byte for byte
/// (python/tests/test_protocol.py). `PIPESWITCH_BLESS=1` writes them; else
/// the committed files must equal what this side encodes now, so a change
/// of an encoding cannot go unnoticed by the Python side.
#[test]
fn golden_frames_for_python() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tests/data/frames");
    let frames: Vec<(String, Vec<u8>)> = every_message()
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("{:02}-{i:02}.bin", m.kind()), encode_frame(m, 0).unwrap()))
        .collect();
    if std::env::var_os("PIPESWITCH_BLESS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "bin") {
                std::fs::remove_file(p).unwrap();
            }
        }
        for (name, bytes) in &frames {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        return;
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (write the files with PIPESWITCH_BLESS=1)", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bin"))
        .collect();
    present.sort();
    let mut expected: Vec<String> = frames.iter().map(|(n, _)| n.clone()).collect();
    expected.sort();
    assert_eq!(present, expected, "the golden frames differ from every_message(): rerun with PIPESWITCH_BLESS=1");
    for (name, bytes) in &frames {
        let on_disk = std::fs::read(dir.join(name)).unwrap();
        assert!(on_disk == *bytes, "{name} differs from what Rust encodes now: rerun with PIPESWITCH_BLESS=1 and update the Python side");
    }
}

/// Tensor files are sealed once packed, and TensorViews reads the same bytes
/// as unpack_tensors: from a mapping of a sealed file, from copies of an
/// unsealed one (which could shrink under a mapping), and refuses ranges
/// outside either.
#[test]
fn tensor_views_map_sealed_files_and_copy_unsealed_ones() {
    use std::os::fd::{AsRawFd, OwnedFd};
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let big2: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 241) as u8).collect();
    let refs = [
        TensorRef { name: "small", dtype: 3, shape: &[4], data: &[1, 2, 3, 4] },
        TensorRef { name: "big", dtype: 3, shape: &[200_000], data: &big },
        TensorRef { name: "big2", dtype: 3, shape: &[100_000], data: &big2 },
    ];
    let (tensors, file) = pack_tensors(&refs).unwrap();
    let file = file.expect("large tensors go to a file");
    // Sealed: it can neither shrink nor be written.
    let f = std::fs::File::from(file.try_clone().unwrap());
    assert!(f.set_len(10).is_err(), "a packed tensor file could be truncated");
    assert!(std::os::unix::fs::FileExt::write_at(&f, b"x", 0).is_err(), "a packed tensor file could be written");
    let want: Vec<Vec<u8>> = unpack_tensors(tensors.clone(), Some(&file)).unwrap().into_iter().map(|(_, b)| b).collect();
    assert_eq!(want, vec![vec![1, 2, 3, 4], big.clone(), big2.clone()]);
    let views = TensorViews::new(tensors.clone(), Some(&file)).unwrap();
    let got: Vec<(String, Vec<u8>)> = views.iter().map(|(t, b)| (t.name.clone(), b.to_vec())).collect();
    assert_eq!(got.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(), want);
    assert_eq!(got.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["small", "big", "big2"]);

    // The same bytes in a file without seals: copied, same result.
    let fd = nix::sys::memfd::memfd_create(c"unsealed", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).unwrap();
    let mut uf = std::fs::File::from(fd);
    let mut all = Vec::new();
    std::io::copy(&mut std::fs::File::from(file.try_clone().unwrap()), &mut all).unwrap();
    uf.write_all(&all).unwrap();
    let unsealed = OwnedFd::from(uf);
    assert!(nix::fcntl::fcntl(unsealed.as_raw_fd(), nix::fcntl::FcntlArg::F_GET_SEALS).unwrap() & libc::F_SEAL_SHRINK == 0);
    let views = TensorViews::new(tensors.clone(), Some(&unsealed)).unwrap();
    assert_eq!(views.iter().map(|(_, b)| b.to_vec()).collect::<Vec<_>>(), want);

    // A range past the end, and a shared tensor without a file: refused.
    let mut bad = tensors.clone();
    bad[2].data = TensorData::Shared { offset: 250_000, bytes: 100_000 };
    assert!(matches!(TensorViews::new(bad, Some(&file)), Err(Error::Protocol(_))));
    assert!(matches!(TensorViews::new(tensors, None), Err(Error::Protocol(_))));
}

/// A client may shrink its tensor file and only then seal it, while the
/// receiver is between its size check and its look at the seals: the
/// mapping is then shorter than the ranges checked, and no view may index
/// past it (that panicked the worker). Raced many times; every outcome must
/// be an error or views inside the file.
#[test]
fn tensor_views_of_a_file_shrunk_then_sealed_while_checked() {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Barrier};
    // Many tensors: the range checks take long enough for the race.
    let n = 200_000;
    let tensors: Vec<Tensor> = (0..n)
        .map(|i| Tensor { name: String::new(), dtype: 3, shape: vec![1], data: TensorData::Shared { offset: 6000 + (i % 2000) as u64, bytes: 1 } })
        .collect();
    let mut hit = 0;
    for round in 0..100u64 {
        let fd = nix::sys::memfd::memfd_create(
            c"shrinking",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(8192).unwrap();
        let file = Arc::new(OwnedFd::from(file));
        let go = Arc::new(Barrier::new(2));
        let shrunk = Arc::new(AtomicBool::new(false));
        let helper = {
            let (file, go, shrunk) = (file.clone(), go.clone(), shrunk.clone());
            std::thread::spawn(move || {
                go.wait();
                std::thread::sleep(std::time::Duration::from_micros(round % 10 * 100));
                let f = std::fs::File::from(file.try_clone().unwrap());
                f.set_len(4096).unwrap();
                nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_SHRINK)).unwrap();
                shrunk.store(true, Ordering::SeqCst);
            })
        };
        let mine = tensors.clone();
        go.wait();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            TensorViews::new(mine, Some(&file)).map(|v| v.iter().map(|(_, b)| b.len()).sum::<usize>())
        }));
        helper.join().unwrap();
        match r {
            Err(_) => panic!("TensorViews panicked on a file shrunk and sealed while it was checked"),
            Ok(Ok(total)) => assert_eq!(total, n),
            // Refused: the file was too short at the size check, when read, or when mapped.
            Ok(Err(_)) => hit += 1,
        }
        assert!(shrunk.load(Ordering::SeqCst));
    }
    eprintln!("{hit} of 100 races refused");
}

/// TensorViews maps only the bytes the tensors name: a client's sealed file
/// may be far larger (sparse) than its tensors, and mapping it whole, with
/// every page populated, made the receiver allocate all of it.
#[test]
fn tensor_views_populate_only_the_ranges_named() {
    use std::os::fd::{AsRawFd, OwnedFd};
    let fd = nix::sys::memfd::memfd_create(
        c"sparse",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .unwrap();
    let file = std::fs::File::from(fd);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::os::unix::fs::FileExt::write_all_at(&file, &data, 4096).unwrap();
    file.set_len(256 << 20).unwrap();
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_SHRINK)).unwrap();
    let file = OwnedFd::from(file);
    let tensors = vec![Tensor { name: "x".into(), dtype: 3, shape: vec![300_000], data: TensorData::Shared { offset: 4096, bytes: 300_000 } }];
    let views = TensorViews::new(tensors, Some(&file)).unwrap();
    assert_eq!(views.iter().map(|(_, b)| b.to_vec()).collect::<Vec<_>>(), vec![data]);
    let allocated = nix::sys::stat::fstat(file.as_raw_fd()).unwrap().st_blocks as u64 * 512;
    assert!(allocated < 4 << 20, "a 300 kB tensor in a 256 MB sparse file: {allocated} bytes of it allocated");
}

/// A tensor that claims more bytes than this process could ever hold (of a
/// sparse file that large): refused with an error, sealed file or not,
/// never a panic or an abort on the allocation.
#[test]
fn tensor_views_of_impossibly_large_tensors_are_errors() {
    use std::os::fd::{AsRawFd, OwnedFd};
    for seal in [false, true] {
        let fd = nix::sys::memfd::memfd_create(
            c"vast",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len((1 << 62) + 4096).unwrap();
        if seal {
            nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_SHRINK)).unwrap();
        }
        let file = OwnedFd::from(file);
        let tensors = vec![Tensor { name: "vast".into(), dtype: 3, shape: vec![1 << 62], data: TensorData::Shared { offset: 4096, bytes: 1 << 62 } }];
        let r = std::panic::catch_unwind(|| TensorViews::new(tensors, Some(&file)).map(|_| ()));
        match r {
            Ok(Err(_)) => {}
            Ok(Ok(())) => panic!("a 4 EiB tensor was viewed (sealed: {seal})"),
            Err(_) => panic!("TensorViews panicked on a 4 EiB tensor (sealed: {seal})"),
        }
    }
}
