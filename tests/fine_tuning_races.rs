//! The fine-tuning service's races, each driven into its window: a cancel that arrives during
//! a job's last pass (the job ends `cancelled` and nothing of it is served), a file deleted
//! while a job that reads it is created (one of the two wins cleanly: a job never points at
//! a deleted file), and an upload whose client goes away (its partial file is removed, and a
//! restart sweeps any left by a killed process). Concurrent saves of named mixes are in
//! `adapters::mixes`' unit tests.

mod common;

use candle_core::Device;
use common::server::Server;
use common::shared_dir;
use loraplex::adapters::registry::Registry;
use loraplex::engine::Background;
use loraplex::finetune::objects::{JobStatus, LoraSettings};
use loraplex::finetune::{FineTuneError, FineTuning, JobRequest};
use loraplex::model::load::{load_model, LoadedModel};
use loraplex::model::tokenizer::TextTokenizer;
use loraplex::model::WeightFormat;
use std::path::Path;
use std::sync::Arc;

fn tiny() -> LoadedModel {
    let dir = shared_dir().join("reference/archs/qwen2/model");
    load_model(dir.to_str().unwrap(), WeightFormat::Dense(candle_core::DType::F32), &Device::Cpu)
        .unwrap()
}

/// A fine-tuning service over the tiny model, its adapters folder and state folder in `root`.
fn service(root: &Path, m: &LoadedModel) -> (Arc<FineTuning>, Arc<Registry>) {
    let registry = Arc::new(
        Registry::new(&root.join("adapters"), m.model.cfg.clone(), None, Device::Cpu, 1 << 30)
            .unwrap(),
    );
    let ft = FineTuning::open(
        &root.join("state"),
        registry.clone(),
        Arc::new(
            TextTokenizer::from_dir(&shared_dir().join("reference/archs/qwen2/model")).unwrap(),
        ),
        m.id.clone(),
        m.model.cfg.clone(),
        Ok(()),
    )
    .unwrap();
    (Arc::new(ft), registry)
}

fn training_file(ft: &FineTuning) -> String {
    let lines: String = (0..4)
        .map(|i| format!("{{\"prompt\": \"count {i}\", \"completion\": \" {}\"}}\n", i + 1))
        .collect();
    let (id, upload) = ft.new_upload();
    std::fs::write(&upload, lines).unwrap();
    ft.add_file(id, &upload, "count.jsonl".into(), "fine-tune").unwrap().id
}

fn request(m: &LoadedModel, file: &str) -> JobRequest {
    JobRequest {
        model: m.id.clone(),
        training_file: file.to_string(),
        validation_file: None,
        suffix: Some("race".into()),
        seed: Some(1),
        n_epochs: Some(2),
        batch_size: Some(2),
        learning_rate_multiplier: None,
        lora: LoraSettings {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_dora: false,
        },
        metadata: None,
    }
}

/// Runs the service's slices on this thread until no job is pending.
fn drain(ft: &FineTuning, m: &LoadedModel) {
    for _ in 0..10_000 {
        if !ft.pending() {
            return;
        }
        ft.run_slice(&m.model);
    }
    panic!("the job did not finish");
}

#[test]
fn a_cancel_during_the_last_pass_wins_and_nothing_is_served() {
    let m = tiny();
    let root = tempfile::tempdir().unwrap();
    let (ft, registry) = service(root.path(), &m);
    let file = training_file(&ft);
    let job = ft.create_job(request(&m, &file)).unwrap();
    // The cancel arrives after the last pass began: past the check at the pass's start.
    let (canceller, id) = (ft.clone(), job.id.clone());
    ft.set_commit_hook(Box::new(move || {
        canceller.cancel(&id).unwrap();
    }));
    drain(&ft, &m);
    let done = ft.job(&job.id).unwrap();
    assert_eq!(done.status, JobStatus::Cancelled, "{done:?}");
    assert!(done.fine_tuned_model.is_none());
    registry.rescan();
    let served: Vec<String> = registry.list().into_iter().map(|a| a.name).collect();
    assert!(served.is_empty(), "a cancelled job's adapters are served: {served:?}");
    let left: Vec<_> = std::fs::read_dir(root.path().join("adapters"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with(".loraplex-state") && n != "mixes.toml")
        .collect();
    assert!(left.is_empty(), "left in the adapters folder: {left:?}");
    assert!(ft.checkpoints(&job.id).unwrap().is_empty());

    // Without a cancel the same job succeeds and serves (the window is the only difference).
    let job = ft.create_job(request(&m, &file)).unwrap();
    drain(&ft, &m);
    let done = ft.job(&job.id).unwrap();
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    registry.rescan();
    let name = done.fine_tuned_model.unwrap();
    assert!(registry.list().iter().any(|a| a.name == name), "{name} is not served");
}

#[test]
fn a_file_deleted_while_a_job_is_created_never_leaves_the_job_without_it() {
    let m = tiny();
    let root = tempfile::tempdir().unwrap();
    let (ft, _registry) = service(root.path(), &m);
    let (mut jobs_made, mut deletes) = (0, 0);
    for round in 0..40u64 {
        let file = training_file(&ft);
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let (f2, b2, id2) = (ft.clone(), barrier.clone(), file.clone());
        // Each round deletes a little later, so the rounds sweep the create's whole span.
        let delay = std::time::Duration::from_micros(50 * round);
        let deleter = std::thread::spawn(move || {
            b2.wait();
            std::thread::sleep(delay);
            f2.delete_file(&id2)
        });
        barrier.wait();
        let created = ft.create_job(request(&m, &file));
        let deleted = deleter.join().unwrap();
        match (&created, &deleted) {
            // The job won: the file stays, and its delete was refused as in use.
            (Ok(job), Err(FineTuneError::Conflict(_))) => {
                jobs_made += 1;
                assert!(ft.file(&file).is_ok(), "round {round}: job {} lost its file", job.id);
                ft.cancel(&job.id).unwrap();
            }
            // The delete won: the job is refused at creation, naming the file.
            (Err(FineTuneError::Invalid { param, .. }), Ok(())) => {
                assert_eq!(*param, Some("training_file"), "round {round}");
                deletes += 1;
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    assert!(
        jobs_made > 0 && deletes > 0,
        "one side always won: {jobs_made} jobs, {deletes} deletes"
    );
}

#[test]
fn an_upload_cut_off_by_its_client_leaves_no_file() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap().to_string();
    let uploads = |state: &Path| -> Vec<String> {
        std::fs::read_dir(state.join("files"))
            .map(|r| {
                r.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.ends_with(".upload"))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Sends the multipart head and part of the file, then `finish` the connection.
    let cut_upload = |port: u16| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let head = "--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n";
        let req = format!("POST /v1/files HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 1000000\r\n\r\n{head}");
        s.write_all(req.as_bytes()).unwrap();
        s.write_all("{\"prompt\": \"a\", \"completion\": \"b\"}\n".repeat(200).as_bytes()).unwrap();
        s.flush().unwrap();
        s
    };
    let mut server = Server::start(&dir.path().join("adapters"), &["--state-dir", &state_arg]);
    let conn = cut_upload(server.port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while uploads(&state).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!uploads(&state).is_empty(), "the upload never started");
    drop(conn); // the client goes away mid-file
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !uploads(&state).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(uploads(&state).is_empty(), "partial uploads left: {:?}", uploads(&state));
    // A process killed mid-upload leaves its partial file; the next start sweeps it.
    let _conn = cut_upload(server.port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while uploads(&state).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    assert!(!uploads(&state).is_empty(), "the killed upload left nothing to sweep");
    let _server = Server::start(&dir.path().join("adapters"), &["--state-dir", &state_arg]);
    assert!(uploads(&state).is_empty(), "not swept at start: {:?}", uploads(&state));
}
