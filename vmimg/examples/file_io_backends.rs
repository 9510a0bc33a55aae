//! Measures the file storage's thread-pool I/O against a bare io_uring loop on the same
//! workloads, to justify the choice of I/O mechanism (`cargo run --release --example
//! file_io_backends [DIR]`). The io_uring side has no executor, no copies and no bounds checks:
//! it is the ceiling io_uring could reach, not a competing implementation.

use io_uring::{opcode, types, IoUring};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Instant;
use vmimg::io_buf::AlignedBuf;
use vmimg::{FileStorageOpen, Storage, StorageExt};

const FILE_SIZE: u64 = 1 << 30;

struct Workload {
    name: &'static str,
    block: usize,
    depth: usize,
    ops: usize,
    direct: bool,
    random: bool,
    write: bool,
}

fn offsets(w: &Workload) -> Vec<u64> {
    let blocks = FILE_SIZE / w.block as u64;
    let mut rng = fastrand::Rng::with_seed(42);
    (0..w.ops as u64)
        .map(|i| {
            let b = if w.random {
                rng.u64(0..blocks)
            } else {
                i % blocks
            };
            b * w.block as u64
        })
        .collect()
}

fn pool_run(path: &std::path::Path, w: &Workload) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread().build().unwrap();
    rt.block_on(async {
        let s: Arc<dyn Storage> = Arc::new(
            FileStorageOpen::new(path)
                .direct(w.direct)
                .writable(w.write)
                .open()
                .await
                .unwrap(),
        );
        let offs = Arc::new(offsets(w));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..w.depth {
            let s = Arc::clone(&s);
            let offs = Arc::clone(&offs);
            let block = w.block;
            let depth = w.depth;
            let write = w.write;
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0x5au8; block];
                for &off in offs.iter().skip(t).step_by(depth) {
                    if write {
                        s.write_at(off, &buf).await.unwrap();
                    } else {
                        s.read_at(off, &mut buf).await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed().as_secs_f64()
    })
}

fn uring_run(path: &std::path::Path, w: &Workload) -> f64 {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(w.write);
    if w.direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = opts.open(path).unwrap();
    let fd = types::Fd(file.as_raw_fd());
    let mut ring = IoUring::new(w.depth.next_power_of_two() as u32).unwrap();
    let mut bufs: Vec<AlignedBuf> = (0..w.depth)
        .map(|_| AlignedBuf::zeroed(w.block, 4096))
        .collect();
    let offs = offsets(w);
    let write = w.write;
    let mut next = 0usize;
    let mut done = 0usize;
    let start = Instant::now();
    let push = |ring: &mut IoUring, bufs: &mut [AlignedBuf], slot: usize, off: u64| {
        let buf = &mut bufs[slot];
        let sqe = if write {
            opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32)
                .offset(off)
                .build()
        } else {
            opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32)
                .offset(off)
                .build()
        }
        .user_data(slot as u64);
        // SAFETY: the buffer of `slot` stays alive and untouched until its completion is
        // reaped below (one request per slot), and the file outlives the ring's use of it.
        unsafe { ring.submission().push(&sqe).unwrap() };
    };
    for slot in 0..w.depth.min(offs.len()) {
        push(&mut ring, &mut bufs, slot, offs[next]);
        next += 1;
    }
    while done < offs.len() {
        ring.submit_and_wait(1).unwrap();
        let completed: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in completed {
            assert_eq!(res, w.block as i32, "short or failed I/O");
            done += 1;
            if next < offs.len() {
                push(&mut ring, &mut bufs, slot as usize, offs[next]);
                next += 1;
            }
        }
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "/var/tmp".into());
    let tmp = tempfile::tempdir_in(dir).unwrap();
    let path = tmp.path().join("bench.bin");
    {
        let rt = tokio::runtime::Builder::new_multi_thread().build().unwrap();
        rt.block_on(async {
            let s = FileStorageOpen::new(&path)
                .create(true)
                .open()
                .await
                .unwrap();
            let chunk: Vec<u8> = (0..(4u32 << 20)).map(|i| (i * 7 + 3) as u8).collect();
            let mut off = 0;
            while off < FILE_SIZE {
                s.write_at(off, &chunk).await.unwrap();
                off += chunk.len() as u64;
            }
            s.sync().await.unwrap();
        });
    }
    let workloads = [
        Workload {
            name: "4k random read QD32, page cache",
            block: 4096,
            depth: 32,
            ops: 400_000,
            direct: false,
            random: true,
            write: false,
        },
        Workload {
            name: "4k random read QD32, O_DIRECT",
            block: 4096,
            depth: 32,
            ops: 100_000,
            direct: true,
            random: true,
            write: false,
        },
        Workload {
            name: "1M sequential read QD8, page cache",
            block: 1 << 20,
            depth: 8,
            ops: 4096,
            direct: false,
            random: false,
            write: false,
        },
        Workload {
            name: "1M sequential read QD8, O_DIRECT",
            block: 1 << 20,
            depth: 8,
            ops: 2048,
            direct: true,
            random: false,
            write: false,
        },
        Workload {
            name: "4k random write QD32, page cache",
            block: 4096,
            depth: 32,
            ops: 200_000,
            direct: false,
            random: true,
            write: true,
        },
        Workload {
            name: "4k random write QD32, O_DIRECT",
            block: 4096,
            depth: 32,
            ops: 50_000,
            direct: true,
            random: true,
            write: true,
        },
    ];
    println!(
        "{:<38} {:>14} {:>14} {:>7}",
        "workload", "pool ops/s", "uring ops/s", "ratio"
    );
    for w in &workloads {
        let mut pool = Vec::new();
        let mut uring = Vec::new();
        for _ in 0..3 {
            pool.push(w.ops as f64 / pool_run(&path, w));
            uring.push(w.ops as f64 / uring_run(&path, w));
        }
        pool.sort_by(f64::total_cmp);
        uring.sort_by(f64::total_cmp);
        println!(
            "{:<38} {:>14.0} {:>14.0} {:>7.2}",
            w.name,
            pool[1],
            uring[1],
            pool[1] / uring[1]
        );
    }
}
