//! `Server`: a dm-server's REST API, through `datamover_control`'s client.

use crate::*;

/// Why waiting for a session stopped early.
enum Waited {
    Client(datamover_control::client::ClientError),
    Interrupted(PyErr),
}

impl From<datamover_control::client::ClientError> for Waited {
    fn from(e: datamover_control::client::ClientError) -> Self {
        Waited::Client(e)
    }
}

/// A dm-server, through its REST API (the same calls as `dm --server`).
/// Answers are the API's JSON as dicts and lists.
#[pyclass(module = "datamover", frozen)]
pub(crate) struct Server {
    client: datamover_control::client::Client,
}

impl Server {
    /// Ask for `req` and wait for its end (Ctrl-C stops the wait).
    fn files_call(
        &self,
        py: Python<'_>,
        req: datamover_control::api::FilesRequest,
    ) -> PyResult<datamover_control::api::FilesJob> {
        let c = self.client.clone();
        py.detach(move || {
            c.files(&req, || {
                Python::attach(|py| py.check_signals()).map_err(Waited::Interrupted)
            })
        })
        .map_err(|e| match e {
            Waited::Client(e) => client_err(e),
            Waited::Interrupted(e) => e,
        })
    }

    /// `ask` a recovery of the server, then, with `wait`, poll it until
    /// `until` holds or it ended (Ctrl-C stops the wait).
    fn recovery_call<'py>(
        &self,
        py: Python<'py>,
        wait: bool,
        until: fn(&datamover_control::api::Recovery) -> bool,
        ask: impl FnOnce(
            &datamover_control::client::Client,
        ) -> datamover_control::client::Result<datamover_control::api::Recovery>
        + Send,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.client.clone();
        let r = py
            .detach(move || -> Result<_, Waited> {
                let r = ask(&c)?;
                if !wait {
                    return Ok(r);
                }
                c.wait_recovery(r.id, until, |_| {
                    Python::attach(|py| py.check_signals()).map_err(Waited::Interrupted)
                })
            })
            .map_err(|e| match e {
                Waited::Client(e) => client_err(e),
                Waited::Interrupted(e) => e,
            })?;
        crate::as_py(py, &r)
    }

    fn call<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = self.client.clone();
        let (method, path) = (method.to_string(), path.to_string());
        let v: serde_json::Value = py
            .detach(move || match (method.as_str(), body) {
                ("GET", _) => c.get(&path),
                ("POST", b) => c.post(&path, &b.unwrap_or(serde_json::json!({}))),
                ("PATCH", b) => c.patch(&path, &b.unwrap_or(serde_json::json!({}))),
                _ => c.delete(&path).map(|()| serde_json::Value::Null),
            })
            .map_err(client_err)?;
        py.import("json")?.getattr("loads")?.call1((v.to_string(),))
    }

    fn json_of(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
        let s: String = py
            .import("json")?
            .getattr("dumps")?
            .call1((obj,))?
            .extract()?;
        serde_json::from_str(&s).map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

#[pymethods]
impl Server {
    /// Connect to `url` (https://host:port), trusting the CA certificate at
    /// `ca`, with an API token (or a file holding it).
    #[new]
    #[pyo3(signature = (url, *, ca, token=None, token_file=None, timeout=60.0))]
    fn new(
        url: &str,
        ca: PathBuf,
        token: Option<String>,
        token_file: Option<PathBuf>,
        timeout: f64,
    ) -> PyResult<Self> {
        let ca_pem = std::fs::read_to_string(&ca)
            .map_err(|e| PyFileNotFoundError::new_err(format!("{}: {e}", ca.display())))?;
        let token = match (token, token_file) {
            (Some(t), _) => t,
            (None, Some(f)) => std::fs::read_to_string(&f)
                .map_err(|e| PyFileNotFoundError::new_err(format!("{}: {e}", f.display())))?
                .trim()
                .to_string(),
            (None, None) => return Err(PyValueError::new_err("give token= or token_file=")),
        };
        let client = datamover_control::client::Client::new(
            url,
            &ca_pem,
            None,
            datamover_control::client::Auth::Token(token),
            secs(timeout)?,
        )
        .map_err(client_err)?;
        Ok(Server { client })
    }

    /// Proxies: slots, state, running tasks, datastores.
    fn proxies<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, "GET", &datamover_control::api::paths::proxies(), None)
    }

    /// The VM inventory: every hypervisor's VMs with their disks, as the
    /// hypervisors' proxies last reported them. A job's ``vms`` names them.
    fn vms<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, "GET", &datamover_control::api::paths::vms(), None)
    }

    /// Change a proxy's settings: slots, modes, site, disabled.
    #[pyo3(signature = (name, **settings))]
    fn set_proxy<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        settings: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = match settings {
            Some(d) => Self::json_of(py, d.as_any())?,
            None => serde_json::json!({}),
        };
        self.call(
            py,
            "PATCH",
            &datamover_control::api::paths::proxy(name),
            Some(body),
        )
    }

    /// Managed hosts.
    fn hosts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, "GET", &datamover_control::api::paths::hosts(), None)
    }

    /// Add a host; the answer's ``enrollment_token`` is for the host's
    /// ``dm-installer`` (or ``dm-proxy`` run by hand). ``roles=["proxy"]``
    /// makes its installer deploy and run the proxy; ``datastores`` are
    /// the directories that proxy may read disks from and restore into;
    /// ``hypervisor`` (a libvirt URI, ``qemu:///system``) makes it a
    /// hypervisor whose VMs enter the inventory (``vms()``).
    #[pyo3(signature = (name, addresses=Vec::new(), *, roles=Vec::new(), datastores=Vec::new(), hypervisor=None))]
    fn add_host<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        addresses: Vec<String>,
        roles: Vec<String>,
        datastores: Vec<String>,
        hypervisor: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut body = serde_json::json!({"name": name, "addresses": addresses, "roles": roles, "datastores": datastores});
        if let Some(h) = hypervisor {
            body["hypervisor"] = serde_json::Value::String(h);
        }
        self.call(
            py,
            "POST",
            &datamover_control::api::paths::hosts(),
            Some(body),
        )
    }

    /// Set a host's roles (``[]`` takes them all away); its installer
    /// follows within a poll.
    fn set_host_roles<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        roles: Vec<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = serde_json::json!({ "roles": roles });
        self.call(
            py,
            "PATCH",
            &datamover_control::api::paths::host(name),
            Some(body),
        )
    }

    /// Set the datastores a host's proxy may use (``[]`` takes them all
    /// away); it may report fewer, never more.
    fn set_host_datastores<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        datastores: Vec<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = serde_json::json!({ "datastores": datastores });
        self.call(
            py,
            "PATCH",
            &datamover_control::api::paths::host(name),
            Some(body),
        )
    }

    /// API tokens: name, role, created, expires (never their secrets).
    fn tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, "GET", &datamover_control::api::paths::tokens(), None)
    }

    /// Make an API token with ``role`` (``admin``, ``operator`` or
    /// ``auditor``) expiring in ``expires_days``; the answer's ``secret``
    /// is shown only this once.
    #[pyo3(signature = (name, role, *, expires_days=90))]
    fn create_token<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        role: &str,
        expires_days: u32,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = serde_json::json!({"name": name, "role": role, "expires_days": expires_days});
        self.call(
            py,
            "POST",
            &datamover_control::api::paths::tokens(),
            Some(body),
        )
    }

    /// Revoke an API token: it stops working at once.
    fn revoke_token(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.call(
            py,
            "DELETE",
            &datamover_control::api::paths::token(name),
            None,
        )
        .map(|_| ())
    }

    /// The newest ``limit`` entries of the audit log (who changed what,
    /// when), newest first.
    #[pyo3(signature = (limit=50))]
    fn audit<'py>(&self, py: Python<'py>, limit: u32) -> PyResult<Bound<'py, PyAny>> {
        self.call(
            py,
            "GET",
            &datamover_control::api::paths::audit(limit),
            None,
        )
    }

    /// Remove a host (revokes its certificate).
    fn remove_host(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.call(
            py,
            "DELETE",
            &datamover_control::api::paths::host(name),
            None,
        )
        .map(|_| ())
    }

    /// Repositories.
    fn repositories<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(
            py,
            "GET",
            &datamover_control::api::paths::repositories(),
            None,
        )
    }

    /// Add a repository: a directory at the same path on every proxy
    /// (shared storage), or with ``proxy=`` one held and served by that
    /// proxy's repository service (the target of replication jobs).
    #[pyo3(signature = (name, path, *, proxy=None))]
    fn add_repository<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        path: &str,
        proxy: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = serde_json::to_value(datamover_control::api::Repository {
            name: name.into(),
            path: path.into(),
            proxy: proxy.map(str::to_string),
        })
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
        self.call(
            py,
            "POST",
            &datamover_control::api::paths::repositories(),
            Some(body),
        )
    }

    /// Jobs.
    fn jobs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, "GET", &datamover_control::api::paths::jobs(), None)
    }

    /// Create a job from a dict of the API's JobSpec (name, kind,
    /// repository, disks, proxies, transport, failover_to_network,
    /// retries, every_minutes, overwrite: restore over existing files).
    fn create_job<'py>(
        &self,
        py: Python<'py>,
        spec: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = Self::json_of(py, spec)?;
        self.call(
            py,
            "POST",
            &datamover_control::api::paths::jobs(),
            Some(body),
        )
    }

    /// Run a job; with ``wait=True`` return its session once it ended.
    #[pyo3(signature = (name, *, wait=false))]
    fn run_job<'py>(&self, py: Python<'py>, name: &str, wait: bool) -> PyResult<Bound<'py, PyAny>> {
        let s = self.call(
            py,
            "POST",
            &datamover_control::api::paths::job_run(name),
            None,
        )?;
        if !wait {
            return Ok(s);
        }
        let id: u64 = s.get_item("id")?.extract()?;
        let c = self.client.clone();
        let end = py
            .detach(move || {
                c.wait_session(id, |_| -> Result<(), Waited> {
                    Python::attach(|py| py.check_signals()).map_err(Waited::Interrupted)
                })
            })
            .map_err(|e| match e {
                Waited::Client(e) => client_err(e),
                Waited::Interrupted(e) => e,
            })?;
        let v = serde_json::to_value(&end).map_err(|e| PyValueError::new_err(e.to_string()))?;
        py.import("json")?.getattr("loads")?.call1((v.to_string(),))
    }

    /// An operation on the replicas of VM `vm` of replication job `job`:
    /// "failover", "undo" or "failback", run by the proxy holding them.
    /// With ``wait=True`` (the default) return the operation once it
    /// ended (``state`` "done" with ``result``, or "failed" with ``error``).
    #[pyo3(signature = (job, vm, action, *, on=None, to=None, start=true, wait=true))]
    #[allow(clippy::too_many_arguments)]
    fn replica_operation<'py>(
        &self,
        py: Python<'py>,
        job: &str,
        vm: &str,
        action: &str,
        on: Option<String>,
        to: Option<String>,
        start: bool,
        wait: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let action: datamover_control::api::ReplicaAction =
            serde_json::from_value(serde_json::json!(action)).map_err(|_| {
                PyValueError::new_err(format!("action {action:?}: use failover, undo or failback"))
            })?;
        let req = datamover_control::api::ReplicaRequest {
            action,
            vm: vm.to_string(),
            on,
            to,
            start,
        };
        let (c, job) = (self.client.clone(), job.to_string());
        let op = py
            .detach(move || -> Result<_, Waited> {
                let op = c.replica_operation(&job, &req).map_err(Waited::Client)?;
                if !wait {
                    return Ok(op);
                }
                c.wait_operation(op.id, || {
                    Python::attach(|py| py.check_signals()).map_err(Waited::Interrupted)
                })
            })
            .map_err(|e| match e {
                Waited::Client(e) => client_err(e),
                Waited::Interrupted(e) => e,
            })?;
        crate::as_py(py, &op)
    }

    /// Instant VM recovery: the proxy holding `repository` (or `proxy`,
    /// which reads the points from the holder's repository service; then
    /// name each disk in `points`) starts `vm` from its points (each
    /// disk's newest, or `points`: "vm/disk[@id]") as domain `on`
    /// (default "libvirt:///VM-instant" on its hypervisor). With `wait`,
    /// returns once it serves (or failed).
    #[pyo3(signature = (repository, vm, *, points=None, on=None, proxy=None, wait=true))]
    #[allow(clippy::too_many_arguments)]
    fn start_recovery<'py>(
        &self,
        py: Python<'py>,
        repository: &str,
        vm: &str,
        points: Option<Vec<String>>,
        on: Option<String>,
        proxy: Option<String>,
        wait: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let req = datamover_control::api::RecoveryRequest {
            repository: repository.to_string(),
            vm: vm.to_string(),
            points: points.unwrap_or_default(),
            on,
            proxy,
        };
        self.recovery_call(
            py,
            wait,
            datamover_control::api::Recovery::serves,
            move |c| c.create_recovery(&req),
        )
    }

    /// List `path` ("/FILESYSTEM/PATH"; "/" lists the filesystems) of
    /// `point` ("vm/disk[@id]") in `repository`, read by the proxy
    /// holding it: the entries.
    #[pyo3(signature = (repository, point, path="/"))]
    fn files_ls<'py>(
        &self,
        py: Python<'py>,
        repository: &str,
        point: &str,
        path: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let req = datamover_control::api::FilesRequest {
            repository: repository.to_string(),
            point: point.to_string(),
            op: datamover_control::api::FilesOp::Ls,
            paths: vec![path.to_string()],
        };
        let j = self.files_call(py, req)?;
        crate::as_py(py, &j.entries.unwrap_or_default())
    }

    /// Download a tar archive of `paths` of `point` in `repository` to the
    /// new file `file`: its size.
    fn files_tar(
        &self,
        py: Python<'_>,
        repository: &str,
        point: &str,
        paths: Vec<String>,
        file: PathBuf,
    ) -> PyResult<u64> {
        let req = datamover_control::api::FilesRequest {
            repository: repository.to_string(),
            point: point.to_string(),
            op: datamover_control::api::FilesOp::Tar,
            paths,
        };
        let j = self.files_call(py, req)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .map_err(|e| PyValueError::new_err(format!("{}: {e}", file.display())))?;
        let c = self.client.clone();
        let (n, _) = py
            .detach(move || {
                c.download(
                    &datamover_control::api::paths::files_content(j.id),
                    &mut f,
                    j.size.unwrap_or(0),
                )
            })
            .map_err(client_err)?;
        Ok(n)
    }

    /// Instant recoveries, newest first.
    fn recoveries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(
            py,
            "GET",
            &datamover_control::api::paths::recoveries(),
            None,
        )
    }

    /// One instant recovery, with its session.
    fn recovery<'py>(&self, py: Python<'py>, id: u64) -> PyResult<Bound<'py, PyAny>> {
        self.call(
            py,
            "GET",
            &datamover_control::api::paths::recovery(id),
            None,
        )
    }

    /// Move recovery `id`'s VM to images in directory `to` (in its
    /// proxy's datastores) while it runs. With `wait`, returns when it
    /// is migrated, or the migration failed (it serves on, with `error`).
    #[pyo3(signature = (id, to, *, format="raw", wait=true))]
    fn migrate_recovery<'py>(
        &self,
        py: Python<'py>,
        id: u64,
        to: &str,
        format: &str,
        wait: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let m = datamover_control::api::RecoveryMigrate {
            to: to.to_string(),
            format: format.to_string(),
        };
        self.recovery_call(
            py,
            wait,
            datamover_control::api::Recovery::control_failed,
            move |c| c.migrate_recovery(id, &m),
        )
    }

    /// Power recovery `id`'s VM off and drop its writes.
    #[pyo3(signature = (id, *, wait=true))]
    fn discard_recovery<'py>(
        &self,
        py: Python<'py>,
        id: u64,
        wait: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.recovery_call(
            py,
            wait,
            datamover_control::api::Recovery::control_failed,
            move |c| c.discard_recovery(id),
        )
    }

    /// Recent operations on VM replicas, newest first.
    fn operations<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.call(
            py,
            "GET",
            &datamover_control::api::paths::operations(),
            None,
        )
    }

    /// One session: its tasks with state, proxy, mode, progress, attempts.
    fn session<'py>(&self, py: Python<'py>, id: u64) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, "GET", &datamover_control::api::paths::session(id), None)
    }

    /// Recent sessions, newest first.
    #[pyo3(signature = (limit=20))]
    fn sessions<'py>(&self, py: Python<'py>, limit: u32) -> PyResult<Bound<'py, PyAny>> {
        self.call(
            py,
            "GET",
            &datamover_control::api::paths::sessions(limit),
            None,
        )
    }
}
