//! Templates and restored clones on real KVM: inside the host VM one script builds the `base`
//! template (`roost templates build`; a second build is a cache hit), waits so that the
//! template's clock falls behind, restores 10 clones from it with `roost sandbox run
//! --template base --id clone-N` and, in each, reads the hostname, 16 bytes of `/dev/urandom`,
//! the wall clock and envd's `/envs` (with the clone's own access token). Every clone must have
//! its own hostname and id, its own random bytes, a current clock, its variables behind its
//! token, its own writable disk (a file one clone writes is not seen by the next, nor by the
//! template) — and nothing may be left behind.
//!
//! Needs qemu-system-x86, release binaries (`cargo build --release -p roost -p roost-agent`)
//! and the `kernel` and `rootfs-base` artefacts (`roost images build`).

use std::collections::HashSet;

use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;

const CLONES: usize = 10;

const SCRIPT: &str = r#"
result() { echo "RESULT $1 $2"; }
RT=/tmp/rt
# Processes that are a roost VMM or sandbox CLI (argv: .../roost vm|sandbox run ...).
roost_procs() {
  for d in /proc/[0-9]*; do
    c=$(tr '\0' ' ' < $d/cmdline 2>/dev/null)
    set -- $c
    case "$1 $2 $3" in roost" "*" run"|*/roost" "*" run")
      case "$2" in vm|sandbox) echo "${d#/proc/} $c";; esac;;
    esac
  done
}
roost templates build --image base --runtime-root $RT --ready-timeout 240 > /tmp/build.out 2>/tmp/build.err
result build $?
roost templates build --image base --runtime-root $RT > /tmp/build2.out 2>/tmp/build2.err
result rebuild-cached "$(grep -c '^template-base *cached' /tmp/build2.out)"
roost templates list > /tmp/list.out 2>&1
result listed "$(grep -c '^template-base .*/snapshot' /tmp/list.out)"
# The template's guest clock stands still from here; each clone must get the host's.
sleep 5
for i in 1 2 3 4 5 6 7 8 9 10; do
  PY="import os, time, urllib.request as u
mark = '/var/tmp/roost-clone-mark'
print('MARK', open(mark).read() if os.path.exists(mark) else 'none')
open(mark, 'w').write('clone-$i')
os.sync()
print('WROTE', open(mark).read())
print('HOST', open('/proc/sys/kernel/hostname').read().strip())
print('RAND', open('/dev/urandom', 'rb').read(16).hex())
print('TIME', int(time.time()))
r = u.Request('http://127.0.0.1:49983/envs', headers={'X-Access-Token': 'tok-$i'})
print('ENVS', u.urlopen(r).read().decode())
try:
    u.urlopen('http://127.0.0.1:49983/envs')
    print('OPEN yes')
except Exception as e:
    print('OPEN', getattr(e, 'code', e))"
  ROOST_SANDBOX_ACCESS_TOKEN=tok-$i timeout 120 roost sandbox run --runtime-root $RT \
      --ready-timeout 90 --template base --id clone-$i --env SANDBOX_NO=$i \
      -- python3 -c "$PY" > /tmp/clone-$i.out 2>/tmp/clone-$i.err
  result clone-$i-exit $?
  result clone-$i-hosttime "$(date +%s)"
  sed -n "s/^\([A-Z]*\) \(.*\)$/RESULT clone-$i-\1 \2/p" /tmp/clone-$i.out
  grep 'ready in' /tmp/clone-$i.err | sed "s/^/TIMING clone-$i /"
done
result leftover-files "$(find $RT -mindepth 1 | wc -l)"
find $RT -mindepth 1 | sed 's/^/LEFTOVER /'
result leftover-procs "$(roost_procs | wc -l)"
roost_procs | sed 's/^/PROC /'
for f in /tmp/*.err; do sed "s|^|STDERR $(basename $f .err): |" "$f"; done
"#;

#[test]
fn templates_in_host_vm_clones_get_their_own_identity() {
    let run = ScriptRun::run(
        HostVm::builder()
            .timeout(roost_hostvm::script::TEST_LIMIT)
            .mem_mib(4096),
        SCRIPT,
        &["kernel", "rootfs-base"],
    )
    .unwrap_or_else(|e| {
        panic!("host VM run (needs release binaries: cargo build --release -p roost): {e:#?}")
    });
    let all = run.transcript();
    let get = |key: &str| run.expect_result(key).to_owned();

    assert_eq!(get("build"), "0", "the template builds; {all}");
    assert_eq!(
        get("rebuild-cached"),
        "1",
        "a second build is a cache hit; {all}"
    );
    assert_eq!(get("listed"), "1", "`templates list` shows it; {all}");

    let mut hosts = HashSet::new();
    let mut randoms = HashSet::new();
    for i in 1..=CLONES {
        let clone = |what: &str| get(&format!("clone-{i}-{what}"));
        assert_eq!(clone("exit"), "0", "clone {i} ran; {all}");
        let host = clone("HOST");
        assert_eq!(host, format!("clone-{i}"), "its id as hostname; {all}");
        hosts.insert(host);
        let random = clone("RAND");
        assert_eq!(random.len(), 32, "{all}");
        randoms.insert(random);
        let guest: i64 = clone("TIME").parse().unwrap();
        let host_time: i64 = clone("hosttime").parse().unwrap();
        assert!(
            (host_time - guest).abs() <= 3,
            "clone {i}'s clock is current (guest {guest}, host {host_time}); {all}"
        );
        let envs: serde_json::Value = serde_json::from_str(&clone("ENVS")).unwrap();
        assert_eq!(
            envs["SANDBOX_NO"],
            i.to_string(),
            "its env behind its token; {all}"
        );
        assert_eq!(clone("OPEN"), "401", "envd requires the token; {all}");
        assert_eq!(
            clone("MARK"),
            "none",
            "earlier clones' disk writes are invisible to this one and to the template; {all}"
        );
        assert_eq!(
            clone("WROTE"),
            format!("clone-{i}"),
            "its own disk is writable; {all}"
        );
    }
    assert_eq!(hosts.len(), CLONES, "distinct hostnames; {all}");
    assert_eq!(randoms.len(), CLONES, "distinct /dev/urandom output; {all}");

    assert_eq!(get("leftover-files"), "0", "no runtime files left; {all}");
    assert_eq!(get("leftover-procs"), "0", "no roost processes left; {all}");
    assert_eq!(run.exit_code, 0, "{all}");
}
