//! Runs mistralrs-quant's ring all-reduce and all-gather between two processes on 127.0.0.1
//! and checks the results against sums and concatenations computed here.
//!
//! `ring-collective-check` (no arguments) runs a ring of 2 ranks, then one of 4: it writes each
//! rank's `RING_CONFIG` file with free ports, starts itself once per rank
//! (`ring-collective-check rank`), and exits 0 only when every rank passes within 60 s. The tensors are prompt-sized (64 tokens x 576 channels, SmolLM2's hidden
//! size): mistral.rs 0.8.1 sizes the wire buffer as `len * size_of_val(x)` = len² bytes, which
//! for them reads gigabytes past the tensor and crashes. A small tensor and a view with an
//! offset are checked too.

use std::net::TcpListener;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, IndexOp, Tensor};
use mistralrs_quant::distributed::AllGather;
use mistralrs_quant::{Comm, Id, SumAllReduce};

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("rank") => match rank_checks() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rank failed: {e:#}");
                ExitCode::FAILURE
            }
        },
        _ => {
            // 2 ranks, where upstream's one-hop sum happens to be right, then 4, where only a
            // sum of every rank's share is.
            for world_size in [2, 4] {
                if !launch(world_size) {
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// Rank `r` contributes `r + 1 + 0.001 * i` at element `i`: every sum and gather is known.
fn share(rank: usize, dims: (usize, usize)) -> candle_core::Result<Tensor> {
    let n = dims.0 * dims.1;
    let values: Vec<f32> = (0..n)
        .map(|i| rank as f32 + 1.0 + 0.001 * (i % 1000) as f32)
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu)
}

fn rank_checks() -> anyhow::Result<()> {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(std::env::var("RING_CONFIG")?)?)?;
    let rank = config["rank"].as_u64().unwrap_or(0) as usize;
    let world_size = config["world_size"].as_u64().unwrap_or(0) as usize;
    let comm = Arc::new(Comm::from_device(
        Id::new(),
        &Device::Cpu,
        rank,
        world_size,
    )?);
    let all_reduce = SumAllReduce::new(&comm);
    let all_gather = AllGather::new(&comm, 0);
    for dims in [(1, 4), (64, 576)] {
        let mine = share(rank, dims)?;
        let expected = (0..world_size)
            .map(|r| share(r, dims))
            .try_fold(Tensor::zeros(dims, DType::F32, &Device::Cpu)?, |acc, s| {
                acc + s?
            })?;
        let sum = all_reduce.sum_all_reduce(&mine)?;
        let error = (sum - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        anyhow::ensure!(error < 1e-5, "all-reduce of {dims:?}: off by {error}");

        let gathered = all_gather.all_gather(&mine)?;
        let expected = Tensor::cat(
            &(0..world_size)
                .map(|r| share(r, dims))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        let error = (gathered - expected)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        anyhow::ensure!(error == 0.0, "all-gather of {dims:?}: off by {error}");
        println!("rank {rank}: all-reduce and all-gather of {dims:?} ok");
    }
    // A view that starts inside its storage: only its own elements may travel.
    let whole = share(rank, (8, 16))?;
    let view = whole.i(4..8)?;
    let expected = (0..world_size).try_fold(
        Tensor::zeros((4, 16), DType::F32, &Device::Cpu)?,
        |acc, r| acc + share(r, (8, 16))?.i(4..8)?,
    )?;
    let error = (all_reduce.sum_all_reduce(&view)? - expected)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    anyhow::ensure!(error < 1e-5, "all-reduce of a view: off by {error}");
    println!("rank {rank}: all-reduce of a view with an offset ok");
    Ok(())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs a ring of `world_size` ranks; whether every rank passed.
fn launch(world_size: usize) -> bool {
    let dir = std::env::temp_dir().join(format!("ring-collective-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Rank r listens on ports[r] and connects to its right neighbour, rank (r + 1) % world_size.
    let ports: Vec<u16> = (0..world_size).map(|_| free_port()).collect();
    let master = free_port();
    let configs: Vec<serde_json::Value> = (0..world_size)
        .map(|rank| {
            let mut config = serde_json::json!({
                "master_port": master, "port": ports[rank], "right_ip": "127.0.0.1",
                "right_port": ports[(rank + 1) % world_size], "rank": rank,
                "world_size": world_size,
            });
            if rank > 0 {
                config["master_ip"] = "127.0.0.1".into();
            }
            config
        })
        .collect();
    let exe = std::env::current_exe().expect("own path");
    let mut children: Vec<_> = configs
        .iter()
        .enumerate()
        .map(|(rank, config)| {
            let path = dir.join(format!("rank{rank}.json"));
            std::fs::write(&path, config.to_string()).expect("write config");
            Command::new(&exe)
                .arg("rank")
                .env("RING_CONFIG", &path)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn rank")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failed = false;
    for (rank, child) in children.iter_mut().enumerate() {
        let status = loop {
            match child.try_wait().expect("wait") {
                Some(status) => break Some(status),
                None if Instant::now() > deadline => break None,
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        match status {
            Some(s) if s.success() => {}
            Some(s) => {
                eprintln!("rank {rank} failed: {s}");
                failed = true;
            }
            None => {
                eprintln!("rank {rank} did not finish within 60 s");
                failed = true;
            }
        }
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    if failed {
        println!("ring collectives of {world_size} ranks: FAILED");
    } else {
        println!(
            "ring collectives of {world_size} ranks: every rank got the right sums and gathers"
        );
    }
    !failed
}
