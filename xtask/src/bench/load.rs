//! A closed-loop load generator on 127.0.0.1: each connection sends a request, waits for the
//! response, and records the latency.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// What `tests/fixtures/echo_server.c` expects and answers.
const REQUEST: usize = 64;
const RESPONSE: usize = 128;

pub struct LoadResult {
    pub requests: u64,
    pub requests_per_s: f64,
    pub p99_us: f64,
}

pub fn run(port: u16, connections: usize, duration: Duration) -> anyhow::Result<LoadResult> {
    let start = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|i| {
            thread::spawn(move || -> anyhow::Result<Vec<u32>> {
                let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                    .context("connecting to the bench server")?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut request = [b'a'; REQUEST];
                request[0] = b'0' + (i % 10) as u8;
                let mut response = [0u8; RESPONSE];
                let mut latencies_ns = Vec::with_capacity(1 << 16);
                while start.elapsed() < duration {
                    let sent = Instant::now();
                    stream.write_all(&request)?;
                    stream
                        .read_exact(&mut response)
                        .context("reading a response from the bench server")?;
                    latencies_ns.push(u32::try_from(sent.elapsed().as_nanos()).unwrap_or(u32::MAX));
                }
                Ok(latencies_ns)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a load generator thread panicked"))??,
        );
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let p99 = latencies
        .get(latencies.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or(0);
    Ok(LoadResult {
        requests: latencies.len() as u64,
        requests_per_s: latencies.len() as f64 / elapsed,
        p99_us: f64::from(p99) / 1e3,
    })
}
