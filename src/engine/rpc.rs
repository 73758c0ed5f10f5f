//! ggml's RPC backend: devices of other machines (`hypura rpc-server` there,
//! `--rpc HOST:PORT,...` here), and serving this machine's device to others.
//!
//! The protocol is ggml's own (version [`sys::RPC_PROTO_VERSION`]); a server
//! of another protocol version is refused at the handshake, which Hypura
//! performs itself first so the error names both versions. It has no
//! authentication: servers bind loopback unless told otherwise.
//!
//! ggml's RPC client aborts the process when a server cannot be reached, its
//! handshake fails or it is lost mid-run. Hypura checks that each server
//! accepts connections before handing it to ggml (a one-line error naming
//! it), and routes ggml's abort through [`install_abort_hook`]: one `error:`
//! line and exit code 1 instead of a backtrace and SIGABRT.

use std::ffi::{c_char, CStr, CString};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hypura_sys as sys;

use super::backend;
use super::device::Device;

/// How long a server has to accept a TCP connection at start-up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a server has to answer the protocol handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected RPC server and its devices.
#[derive(Clone, Debug)]
pub struct Remote {
    pub endpoint: String,
    pub devices: Vec<Device>,
}

/// Parses `HOST:PORT[,HOST:PORT...]` (at most [`sys::RPC_MAX_SERVERS`]).
pub fn parse_endpoints(list: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for ep in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((host, port)) = ep.rsplit_once(':') else {
            bail!("--rpc {ep}: expected HOST:PORT");
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            bail!("--rpc {ep}: no host");
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => bail!("--rpc {ep}: the port must be a number from 1 to 65535"),
        }
        if out.iter().any(|e| e == ep) {
            bail!("--rpc {ep}: named twice");
        }
        out.push(ep.to_string());
    }
    if out.is_empty() {
        bail!("--rpc needs at least one HOST:PORT");
    }
    if out.len() > sys::RPC_MAX_SERVERS {
        bail!(
            "--rpc names {} servers; ggml's RPC backend takes at most {}",
            out.len(),
            sys::RPC_MAX_SERVERS
        );
    }
    Ok(out)
}

/// Whether `endpoint` accepts a TCP connection now and speaks this ggml's
/// protocol version (a one-line reason if not).
fn reachable(endpoint: &str) -> Result<()> {
    let addrs: Vec<_> = endpoint
        .to_socket_addrs()
        .with_context(|| format!("RPC server {endpoint}: cannot resolve the host"))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => return handshake(s, endpoint),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => bail!(
            "RPC server {endpoint} is not reachable ({e}): is `hypura rpc-server` (or llama.cpp's rpc-server) running there?"
        ),
        None => bail!("RPC server {endpoint}: the host has no address"),
    }
}

/// ggml's own handshake (HELLO), done here first so that a server of another
/// protocol version is a one-line error naming both versions; ggml's client
/// would only abort with "handshake failed". The connection is closed after
/// it: a server serves one client at a time and goes back to accepting.
fn handshake(mut s: TcpStream, endpoint: &str) -> Result<()> {
    use std::io::{ErrorKind, Read, Write};
    let (ma, mi, pa) = sys::RPC_PROTO_VERSION;
    let ours = format!("{ma}.{mi}.{pa}");
    let _ = s.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = s.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut req = Vec::with_capacity(9 + sys::RPC_CONN_CAPS_SIZE);
    req.push(sys::RPC_CMD_HELLO);
    req.extend_from_slice(&(sys::RPC_CONN_CAPS_SIZE as u64).to_le_bytes());
    // No transport capabilities: the plain TCP transport (ggml's client
    // negotiates its own on its connection).
    req.resize(9 + sys::RPC_CONN_CAPS_SIZE, 0);
    let answer = s.write_all(&req).and_then(|()| {
        let mut size = [0u8; 8];
        s.read_exact(&mut size)?;
        Ok(u64::from_le_bytes(size))
    });
    let size = match answer {
        Ok(n) => n,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => bail!(
            "RPC server {endpoint} did not answer the handshake within {} s (a server serves one client at a time: is another one connected?)",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        Err(_) => bail!(
            "RPC server {endpoint} closed the connection at the handshake: it is not a ggml RPC server or speaks another protocol version than this build's {ours} (run one built from the same ggml)"
        ),
    };
    let want = 4 + sys::RPC_CONN_CAPS_SIZE as u64;
    if size != want {
        bail!(
            "RPC server {endpoint} answered the handshake with {size} bytes instead of {want}: it speaks another ggml RPC protocol version than this build's {ours} (run one built from the same ggml)"
        );
    }
    let mut rsp = [0u8; 4 + sys::RPC_CONN_CAPS_SIZE];
    if s.read_exact(&mut rsp).is_err() {
        bail!("RPC server {endpoint} broke off the handshake");
    }
    let (major, minor, patch) = (u32::from(rsp[0]), u32::from(rsp[1]), u32::from(rsp[2]));
    // ggml's rule: the same major version, a minor no newer than ours.
    if major != ma || minor > mi {
        bail!(
            "RPC server {endpoint} speaks ggml RPC protocol {major}.{minor}.{patch}, this build {ours}: run a server built from the same ggml (`hypura rpc-server` of this version)"
        );
    }
    Ok(())
}

/// Connects to every server (once per process; later calls reuse the
/// connection) and lists their devices.
pub fn connect(endpoints: &[String]) -> Result<Vec<Remote>> {
    static CONNECTED: Mutex<Vec<(String, Vec<usize>)>> = Mutex::new(Vec::new());
    backend::init();
    let mut out = Vec::with_capacity(endpoints.len());
    for ep in endpoints {
        let mut done = CONNECTED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, devs)) = done.iter().find(|(e, _)| e == ep) {
            out.push(Remote {
                endpoint: ep.clone(),
                devices: devs
                    .iter()
                    .map(|&d| Device::from_raw(d as sys::ggml_backend_dev_t))
                    .collect(),
            });
            continue;
        }
        reachable(ep)?;
        install_abort_hook();
        let c = CString::new(ep.as_str()).context("endpoint contains a NUL byte")?;
        // SAFETY: a NUL-terminated endpoint; ggml copies it. It aborts (our
        // hook: one line, exit 1) if the handshake fails.
        let reg = unsafe { sys::ggml_backend_rpc_add_server(c.as_ptr()) };
        if reg.is_null() {
            bail!("RPC server {ep} has no devices to offer");
        }
        // SAFETY: a live registry entry returned just above.
        let n = unsafe { sys::ggml_backend_reg_dev_count(reg) };
        let devices: Vec<Device> = (0..n)
            // SAFETY: i < the registry's device count.
            .map(|i| unsafe { sys::ggml_backend_reg_dev_get(reg, i) })
            .filter(|d| !d.is_null())
            .map(Device::from_raw)
            .collect();
        if devices.is_empty() {
            bail!("RPC server {ep} has no devices to offer");
        }
        done.push((
            ep.clone(),
            devices.iter().map(|d| d.raw() as usize).collect(),
        ));
        out.push(Remote {
            endpoint: ep.clone(),
            devices,
        });
    }
    Ok(out)
}

/// The median round trip to a remote device (a memory query), in seconds.
pub fn round_trip(dev: &Device) -> f64 {
    let mut t: Vec<f64> = (0..7)
        .map(|_| {
            let t0 = Instant::now();
            let _ = dev.memory();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Host → remote device bandwidth (GB/s): `bytes` sent into one of its
/// buffers, best of three.
pub fn send_bandwidth(dev: &Device, bytes: usize) -> Result<f64> {
    let data = vec![0x5au8; bytes];
    // SAFETY: plain parameter struct; no_alloc: the context holds only the
    // tensor header, its data is in the remote buffer.
    let ctx = unsafe {
        sys::ggml_init(sys::ggml_init_params {
            mem_size: 1 << 12,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        })
    };
    if ctx.is_null() {
        bail!("ggml_init failed");
    }
    // SAFETY: live context; a 1-D i8 tensor of `bytes` elements.
    let t = unsafe { sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I8, bytes as i64) };
    // SAFETY: the device's own buffer type; null on failure.
    let buf = unsafe { sys::ggml_backend_buft_alloc_buffer(dev.buft(), bytes) };
    let result = (|| {
        if buf.is_null() || t.is_null() {
            bail!("{}: cannot allocate {bytes} bytes", dev.name());
        }
        // SAFETY: `t` fits the fresh buffer at its base.
        let st = unsafe {
            sys::ggml_backend_tensor_alloc(buf, t, sys::ggml_backend_buffer_get_base(buf))
        };
        if st != sys::GGML_STATUS_SUCCESS {
            bail!("{}: cannot place a tensor in its buffer", dev.name());
        }
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = Instant::now();
            // SAFETY: `data` holds `bytes` bytes, the tensor's size.
            unsafe { sys::ggml_backend_tensor_set(t, data.as_ptr().cast(), 0, bytes) };
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(bytes as f64 / best.max(1e-9) / 1e9)
    })();
    // SAFETY: the buffer and context made above, used by nothing else now.
    unsafe {
        if !buf.is_null() {
            sys::ggml_backend_buffer_free(buf);
        }
        sys::ggml_free(ctx);
    }
    result
}

/// Routes ggml's aborts (a lost RPC server, a failed handshake) to one
/// `error:` line and exit code 1. Installed once, when RPC is used.
pub fn install_abort_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: sets a process-wide function pointer to a plain function.
    ONCE.call_once(|| unsafe {
        sys::ggml_set_abort_callback(Some(on_ggml_abort));
    });
}

unsafe extern "C" fn on_ggml_abort(message: *const c_char) {
    let msg = match message.is_null() {
        true => String::new(),
        // SAFETY: ggml passes a NUL-terminated message valid for this call.
        false => unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned(),
    };
    // "file:line: text": the text.
    let text = msg
        .splitn(3, ": ")
        .nth(2)
        .unwrap_or(&msg)
        .trim()
        .to_string();
    let why = backend::take_last_error()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    let hint = match text.contains("RPC") || text.contains("connect") {
        true => ": an RPC server was lost or refused the connection, so the run cannot go on",
        false => "",
    };
    eprintln!("\nerror: ggml: {text}{why}{hint}");
    // SAFETY: _exit ends the process at once (no unwinding across ggml's
    // frames, no destructors of state ggml left half-done).
    unsafe { libc::_exit(1) };
}

/// Serves `devices` on `endpoint` (host:port) until the process is stopped;
/// returns an error only when the server cannot start.
pub fn serve(
    endpoint: &str,
    cache: Option<&std::path::Path>,
    threads: usize,
    devices: &[Device],
) -> Result<()> {
    backend::init();
    let ep = CString::new(endpoint).context("endpoint contains a NUL byte")?;
    let cache = cache
        .map(|p| CString::new(p.as_os_str().as_encoded_bytes()))
        .transpose()
        .context("cache path contains a NUL byte")?;
    let mut raw: Vec<sys::ggml_backend_dev_t> = devices.iter().map(Device::raw).collect();
    // SAFETY: the strings and the device array outlive the call, which
    // blocks while serving (ggml copies what it keeps).
    unsafe {
        sys::ggml_backend_rpc_start_server(
            ep.as_ptr(),
            cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            threads,
            raw.len(),
            raw.as_mut_ptr(),
        )
    };
    bail!("the RPC server could not start on {endpoint} (the address may be in use or not this machine's)")
}

#[cfg(test)]
mod tests {
    use super::parse_endpoints;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoints("127.0.0.1:5,h:6").unwrap(),
            vec!["127.0.0.1:5", "h:6"]
        );
        for bad in ["", "x", "h:", ":5", "h:0", "h:70000", "h:5,h:5", "h:x"] {
            assert!(parse_endpoints(bad).is_err(), "{bad} accepted");
        }
        let many: Vec<String> = (1..=17).map(|p| format!("h:{p}")).collect();
        assert!(parse_endpoints(&many.join(",")).is_err());
    }
}
