"""The deployment files say what the daemon needs, and keep saying it: the Kubernetes manifests under
deploy/kubernetes (injection, hardened injection, sidecar) and the Dockerfile. Every manifest is
checked against the official Kubernetes schemas, offline (kubernetes-validate, strict: an unknown
or misspelt field fails), and then against the rules each mode lives by. The flags and variables
the manifests give the daemon are checked against its settings (execd.config.Settings), the
bundle's path against the Dockerfile, the Secret's name and key against the walk-through in
docs/operations.md. No cluster, no network, no docker daemon: the image's HEALTHCHECK command is
run against a real daemon here instead."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from execd.config import Settings
from tests.helpers_control import free_port, served

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
WALK_THROUGH = [REPO / "docs" / "operations.md", DEPLOY / "README.md"]
# The placeholder for the image built from the Dockerfile (docs tell people to push their own).
EXECD_IMAGE = "ghcr.io/execd/execd:"
PLAIN_INJECTION = "injection.yaml"
HARDENED_INJECTION = "injection-hardened.yaml"
SIDECAR = "sidecar.yaml"
# The oldest Kubernetes release the manifests are checked against, and the newest the validator knows.
SCHEMA_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
# What the "baseline" Pod Security Standard lets a container add.
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
SETTINGS = {f.name: f for f in dataclasses.fields(Settings)}


# --- the Dockerfile ------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for rest in self.all("ENV"):
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                values[name] = value
        return values


def dockerfile_stages() -> list[Stage]:
    """Instructions with their continuation lines joined and comment lines dropped, by stage."""
    instructions: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        instructions.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for instruction in instructions:
        keyword, _, rest = instruction.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return stages


def entrypoint() -> list[str]:
    (rest,) = dockerfile_stages()[-1].all("ENTRYPOINT")
    value = json.loads(rest)
    assert isinstance(value, list), "ENTRYPOINT must be the exec (JSON) form, so that signals reach the daemon"
    return value


def bundle_dir() -> str:
    """Where the image keeps the bundle: the directory of its entry point's binary."""
    return str(PurePosixPath(entrypoint()[0]).parent)


# --- the manifests -------------------------------------------------------------------------------


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")) + sorted(DEPLOY.glob("*.yml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def pods(file: str | None = None) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(file, name, pod spec, pod labels) of every Pod, and of every workload's pod template."""
    found = []
    for name, doc in documents():
        if file is not None and name != file:
            continue
        if doc.get("kind") == "Pod":
            found.append((name, doc["metadata"]["name"], doc["spec"], doc["metadata"].get("labels", {})))
        elif isinstance(doc.get("spec", {}).get("template"), dict):
            template = doc["spec"]["template"]
            found.append((name, doc["metadata"]["name"], template["spec"], template["metadata"].get("labels", {})))
    return found


def argv(container: dict[str, Any]) -> list[str] | None:
    """The command line a container starts: its command and args, or the execd image's ENTRYPOINT
    and the args; None for another image's own entry point (unknown here)."""
    if "command" in container:
        return [str(word) for word in container["command"] + container.get("args", [])]
    if container["image"].startswith(EXECD_IMAGE):
        return entrypoint() + [str(word) for word in container.get("args", [])]
    return None


def is_execd(container: dict[str, Any]) -> bool:
    line = argv(container)
    return bool(line) and len(line) >= 2 and PurePosixPath(line[0]).name == "execd" and line[1] == "serve"


def daemon_flags(container: dict[str, Any]) -> list[str]:
    """The words given to `execd serve`, up to the `--` that starts a supervised command."""
    line = argv(container) or []
    words = line[2:]
    return words[: words.index("--")] if "--" in words else words


def supervised_command(container: dict[str, Any]) -> list[str]:
    words = (argv(container) or [])[2:]
    return words[words.index("--") + 1 :] if "--" in words else []


def env_of(container: dict[str, Any]) -> dict[str, str | None]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def setting(container: dict[str, Any], name: str) -> str | None:
    """A setting as the daemon in this container gets it: flag, else variable, else the image's ENV."""
    flag = "--" + name.replace("_", "-")
    words = daemon_flags(container)
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.partition("=")[2]
    variable = Settings.env_name(name)
    env = env_of(container)
    if variable in env:
        return env[variable]
    if container["image"].startswith(EXECD_IMAGE) and "command" not in container:
        return dockerfile_stages()[-1].env().get(variable)
    return None


def listening_port(container: dict[str, Any]) -> int:
    port = setting(container, "port")
    return int(port) if port is not None else int(str(SETTINGS["port"].default))


def container_port(container: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for item in container.get("ports", []):
        if item.get("name") == port:
            return int(item["containerPort"])
    return None


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in spec.get("volumes", []) if v["name"] == name]
    return found


def mount_at(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"].rstrip("/") == path.rstrip("/"):
            return mount
    return None


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def execd_containers() -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    for file, name, spec, _ in pods():
        for container in spec["containers"]:
            if is_execd(container):
                yield file, f"{name}/{container['name']}", spec, container


def security(spec: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A security setting as it applies to the container: its own, else the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else spec.get("securityContext", {}).get(key)


def sidecar_pods() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    return [p for p in pods() if any(setting(c, "target") for c in p[2]["containers"] if is_execd(c))]


def injection_pods() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    return [
        p for p in pods() if any(is_execd(c) and not c["image"].startswith(EXECD_IMAGE) for c in p[2]["containers"])
    ]


def ids(items: list[tuple[Any, ...]]) -> list[str]:
    return [f"{item[0]}:{item[1]}" for item in items]


EXECD_CONTAINERS = list(execd_containers())


# --- every manifest ------------------------------------------------------------------------------


def test_the_manifests_hold_the_three_modes() -> None:
    files = {name for name, _ in documents()}
    assert {PLAIN_INJECTION, HARDENED_INJECTION, SIDECAR} <= files, files
    for file in (PLAIN_INJECTION, HARDENED_INJECTION, SIDECAR):
        assert pods(file), f"{file} has no pod"
    assert {p[0] for p in sidecar_pods()} == {SIDECAR}
    assert {p[0] for p in injection_pods()} == {PLAIN_INJECTION, HARDENED_INJECTION}


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize(
    "doc", documents(), ids=[f"{name}:{doc.get('kind')}/{doc['metadata']['name']}" for name, doc in documents()]
)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(doc: tuple[str, dict[str, Any]], version: str) -> None:
    try:
        kubernetes_validate.validate(doc[1], version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{doc[0]}: {doc[1]['kind']} {doc[1]['metadata']['name']}: {path}: {exc.message}")


@pytest.mark.parametrize("pod", pods(), ids=ids(pods()))
def test_every_pod_runs_execd(pod: tuple[str, str, dict[str, Any], dict[str, Any]]) -> None:
    assert any(is_execd(c) for c in pod[2]["containers"]), f"{pod[0]}: no container runs `execd serve`"


@pytest.mark.parametrize("item", EXECD_CONTAINERS, ids=ids(EXECD_CONTAINERS))
def test_every_execd_container_has_readiness_and_liveness_probes_on_healthz_at_its_port(
    item: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    file, name, _, container = item
    port = listening_port(container)
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        assert probe and "httpGet" in probe, f"{file}: {name}: no {kind} with httpGet"
        get = probe["httpGet"]
        assert get.get("path") == "/healthz", f"{file}: {name}: {kind} asks {get.get('path')}, not /healthz"
        assert container_port(container, get["port"]) == port, (
            f"{file}: {name}: {kind} asks port {get['port']!r}, the daemon listens on {port}"
        )
        assert get.get("scheme", "HTTP") == "HTTP"


@pytest.mark.parametrize("item", EXECD_CONTAINERS, ids=ids(EXECD_CONTAINERS))
def test_every_flag_and_variable_given_to_execd_is_a_setting_of_the_daemon(
    item: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    file, name, _, container = item
    unknown = []
    for word in daemon_flags(container):
        if not word.startswith("--"):
            continue
        field = word[2:].partition("=")[0].replace("-", "_")
        if field not in SETTINGS and field.startswith("no_") and SETTINGS.get(field[3:]) is not None:
            field = field[3:]
        if field not in SETTINGS:
            unknown.append(word)
    for variable in env_of(container):
        if variable.startswith("EXECD_") and variable.removeprefix("EXECD_").lower() not in SETTINGS:
            unknown.append(variable)
    assert not unknown, f"{file}: {name}: not settings of the daemon (execd.config.Settings): {unknown}"


@pytest.mark.parametrize("item", EXECD_CONTAINERS, ids=ids(EXECD_CONTAINERS))
def test_the_token_is_read_from_a_file_on_a_mounted_secret(
    item: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    file, name, spec, container = item
    path = setting(container, "access_token_file")
    assert path, f"{file}: {name}: no --access-token-file: the daemon would serve without authentication"
    directory, key = str(PurePosixPath(path).parent), PurePosixPath(path).name
    mount = mount_at(container, directory)
    assert mount is not None, f"{file}: {name}: nothing is mounted at {directory}, where the token is read"
    assert mount.get("readOnly") is True, f"{file}: {name}: the token's volume is not mounted read-only"
    secret = volume(spec, mount["name"]).get("secret")
    assert secret, f"{file}: {name}: {directory} is not a Secret volume"
    items = {item["path"]: item["key"] for item in secret.get("items", [])}
    assert not items or key in items, f"{file}: {name}: the Secret's items give no file {key}"


@pytest.mark.parametrize("pod", pods(), ids=ids(pods()))
def test_the_token_is_never_given_on_the_command_line_or_in_the_environment(
    pod: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    for container in all_containers(pod[2]):
        words = container.get("command", []) + container.get("args", [])
        assert not [w for w in words if w == "--access-token" or str(w).startswith("--access-token=")], (
            f"{pod[0]}: {container['name']}: the token on the command line shows in ps"
        )
        assert Settings.env_name("access_token") not in env_of(container), (
            f"{pod[0]}: {container['name']}: use --access-token-file, not {Settings.env_name('access_token')}"
        )


@pytest.mark.parametrize("page", WALK_THROUGH, ids=lambda p: str(p.relative_to(REPO)))
def test_every_secret_the_manifests_mount_is_created_in_the_walk_through(page: Path) -> None:
    created = {
        (m.group(1), m.group(2))
        for m in re.finditer(
            r"kubectl\b[^\n]*?\bcreate secret generic (\S+)[^\n]*?--from-literal=([\w.-]+)=", page.read_text()
        )
    }
    assert created, f"{page.name} creates no Secret with `kubectl create secret generic NAME --from-literal=`"
    for file, name, spec, container in EXECD_CONTAINERS:
        path = setting(container, "access_token_file")
        mount = mount_at(container, str(PurePosixPath(path or "/").parent))
        if mount is None:
            continue  # reported by the test above
        secret = volume(spec, mount["name"]).get("secret", {})
        key = {item["path"]: item["key"] for item in secret.get("items", [])}.get(PurePosixPath(path or "").name)
        wanted = (secret.get("secretName"), key or PurePosixPath(path or "").name)
        assert wanted in created, (
            f"{file}: {name} reads Secret {wanted[0]}, key {wanted[1]}: the walk-through makes {created}"
        )


@pytest.mark.parametrize("pod", pods(), ids=ids(pods()))
def test_every_container_has_resource_requests_and_a_memory_limit(
    pod: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    for container in all_containers(pod[2]):
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), (
            f"{pod[0]}: {container['name']}: no cpu and memory requests"
        )
        assert "memory" in resources.get("limits", {}), f"{pod[0]}: {container['name']}: no memory limit"


@pytest.mark.parametrize("pod", pods(), ids=ids(pods()))
def test_no_pod_gives_session_code_a_kubernetes_api_token(pod: tuple[str, str, dict[str, Any], dict[str, Any]]) -> None:
    assert pod[2].get("automountServiceAccountToken") is False, (
        f"{pod[0]}: automountServiceAccountToken is not false: every session could use the pod's service account"
    )


@pytest.mark.parametrize("pod", pods(), ids=ids(pods()))
def test_every_execd_container_logs_json(pod: tuple[str, str, dict[str, Any], dict[str, Any]]) -> None:
    for container in pod[2]["containers"]:
        if is_execd(container):
            assert setting(container, "log_format") == "json", f"{pod[0]}: {container['name']}: logs not JSON"


def test_every_service_reaches_the_port_execd_listens_on() -> None:
    services = [(file, doc) for file, doc in documents() if doc.get("kind") == "Service"]
    assert services
    for file, service in services:
        selector = service["spec"]["selector"]
        chosen = [p for p in pods(file) if selector.items() <= p[3].items()]
        assert chosen, f"{file}: Service {service['metadata']['name']} selects no pod of its file"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for _, _, spec, _ in chosen:
                listening = {listening_port(c) for c in spec["containers"] if is_execd(c)}
                reached = {container_port(c, target) for c in spec["containers"]}
                assert listening & reached, f"{file}: Service port {port} does not reach execd's {listening}"


# --- sidecar -------------------------------------------------------------------------------------


def target_containers(spec: dict[str, Any], execd: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers whose process --target selects."""
    selector = setting(execd, "target") or ""
    kind, _, value = selector.partition(":")
    others = [c for c in spec["containers"] if c is not execd]
    if kind == "cmdline":
        pattern = re.compile(value)
        assert not pattern.search(" ".join(argv(execd) or [])), f"--target {selector} matches execd's own command"
        return [c for c in others if argv(c) is not None and pattern.search(" ".join(argv(c) or []))]
    if kind == "pidfile":
        directory = str(PurePosixPath(value).parent)
        mine = mount_at(execd, directory)
        return [c for c in others if mine and (theirs := mount_at(c, directory)) and theirs["name"] == mine["name"]]
    pytest.fail(f"--target {selector}: in a pod only cmdline:REGEX or pidfile:PATH can name a process")


SIDECARS = sidecar_pods()


@pytest.mark.parametrize("pod", SIDECARS, ids=ids(SIDECARS))
def test_the_sidecar_pod_shares_its_process_namespace(pod: tuple[str, str, dict[str, Any], dict[str, Any]]) -> None:
    assert pod[2].get("shareProcessNamespace") is True, f"{pod[0]}: execd cannot see the sandbox's processes"


@pytest.mark.parametrize("pod", SIDECARS, ids=ids(SIDECARS))
def test_the_sidecar_target_selects_the_sandbox_container_and_not_execd(
    pod: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    for execd in [c for c in pod[2]["containers"] if is_execd(c)]:
        assert len(target_containers(pod[2], execd)) == 1, (
            f"{pod[0]}: --target {setting(execd, 'target')} must select exactly one other container's command"
        )


@pytest.mark.parametrize("pod", SIDECARS, ids=ids(SIDECARS))
def test_the_sidecar_state_dir_is_one_emptydir_at_the_same_path_in_both_containers(
    pod: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    file, _, spec, _ = pod
    for execd in [c for c in spec["containers"] if is_execd(c)]:
        state_dir = setting(execd, "state_dir")
        assert state_dir, f"{file}: no --state-dir: the shells could not open their session files"
        mine = mount_at(execd, state_dir)
        assert mine is not None, f"{file}: nothing is mounted at --state-dir {state_dir} in execd's container"
        assert "emptyDir" in volume(spec, mine["name"]), f"{file}: the state dir's volume is not an emptyDir"
        assert not mine.get("readOnly")
        for sandbox in target_containers(spec, execd):
            theirs = mount_at(sandbox, state_dir)
            assert theirs is not None and theirs["name"] == mine["name"], (
                f"{file}: {sandbox['name']} does not mount volume {mine['name']} at {state_dir}, as execd does"
            )


@pytest.mark.parametrize("pod", SIDECARS, ids=ids(SIDECARS))
def test_the_sidecar_has_the_capabilities_setns_and_chroot_need(
    pod: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    file, _, spec, _ = pod
    for execd in [c for c in spec["containers"] if is_execd(c)]:
        capabilities = execd.get("securityContext", {}).get("capabilities", {})
        assert {"SYS_ADMIN", "SYS_PTRACE", "SYS_CHROOT"} <= set(capabilities.get("add", [])), (
            f"{file}: execd lacks SYS_ADMIN, SYS_PTRACE or SYS_CHROOT: {capabilities}"
        )
        assert capabilities.get("drop") == ["ALL"], f"{file}: execd keeps the runtime's default capabilities"
        assert security(spec, execd, "runAsUser") in (0, None) and security(spec, execd, "runAsNonRoot") is not True


# --- injection -----------------------------------------------------------------------------------

INJECTIONS = injection_pods()


@pytest.mark.parametrize("pod", INJECTIONS, ids=ids(INJECTIONS))
def test_injection_init_container_copies_the_bundle_into_an_emptydir_the_sandbox_mounts(
    pod: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    file, _, spec, _ = pod
    for sandbox in [c for c in spec["containers"] if is_execd(c) and not c["image"].startswith(EXECD_IMAGE)]:
        binary = PurePosixPath((argv(sandbox) or [""])[0])
        mount = mount_at(sandbox, str(binary.parent))
        assert mount is not None, f"{file}: nothing is mounted at {binary.parent}, where execd is started from"
        assert mount.get("readOnly") is True, f"{file}: session code could replace the daemon's binary"
        assert "emptyDir" in volume(spec, mount["name"]), f"{file}: {binary.parent} is not an emptyDir"
        copies = []
        for init in spec.get("initContainers", []):
            words = argv(init) or []
            theirs = [m for m in init.get("volumeMounts", []) if m["name"] == mount["name"]]
            if not init["image"].startswith(EXECD_IMAGE) or not theirs or not words or words[0] != "cp":
                continue
            source, destination = words[-2], words[-1]
            if source.rstrip("/.").rstrip("/") == bundle_dir() and destination.rstrip("/") == theirs[0]["mountPath"]:
                copies.append(init["name"])
        assert copies, (
            f"{file}: no init container of the execd image copies {bundle_dir()} (the Dockerfile's) into "
            f"volume {mount['name']}"
        )


@pytest.mark.parametrize("pod", INJECTIONS, ids=ids(INJECTIONS))
def test_injection_starts_execd_serve_with_the_original_command_after_double_dash(
    pod: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    for sandbox in [c for c in pod[2]["containers"] if is_execd(c) and not c["image"].startswith(EXECD_IMAGE)]:
        line = argv(sandbox) or []
        assert line[1] == "serve"
        assert "--" in line, f"{pod[0]}: no `--`: the sandbox's own command is not started"
        command = supervised_command(sandbox)
        assert command and not command[0].startswith("-"), f"{pod[0]}: nothing after `--`"
        assert PurePosixPath(command[0]).name != "execd"


def test_plain_injection_runs_as_non_root_and_meets_the_restricted_standard() -> None:
    for file, _, spec, _ in pods(PLAIN_INJECTION):
        assert security(spec, {}, "seccompProfile") == {"type": "RuntimeDefault"}
        for container in all_containers(spec):
            name = f"{file}: {container['name']}"
            assert security(spec, container, "runAsNonRoot") is True, f"{name}: runAsNonRoot is not true"
            assert security(spec, container, "runAsUser") not in (0, None), f"{name}: no non-root runAsUser"
            assert security(spec, container, "seccompProfile") in (None, {"type": "RuntimeDefault"})
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
            assert context.get("capabilities") == {"drop": ["ALL"]}, f"{name}: capabilities"


def test_hardened_injection_runs_the_daemon_as_root_and_the_shells_as_another_user() -> None:
    for file, _, spec, _ in pods(HARDENED_INJECTION):
        for container in [c for c in spec["containers"] if is_execd(c)]:
            assert security(spec, container, "runAsUser") == 0 and security(spec, container, "runAsNonRoot") is not True
            run_as = setting(container, "run_as")
            assert run_as and run_as.partition(":")[0] not in ("0", "root"), f"{file}: shells must not run as root"
            context = container["securityContext"]
            assert context.get("allowPrivilegeEscalation") is False
            assert context["capabilities"]["drop"] == ["ALL"]
            added = set(context["capabilities"].get("add", []))
            assert added <= BASELINE_CAPABILITIES, (
                f"{file}: beyond the baseline standard: {added - BASELINE_CAPABILITIES}"
            )


# Where the shells run as another user than the daemon (with the daemon's own user, as in plain
# injection, they can read whatever it can).
SWITCHING = [item for item in EXECD_CONTAINERS if setting(item[3], "run_as")]


def test_the_hardened_modes_run_the_shells_as_another_user() -> None:
    assert {item[0] for item in SWITCHING} == {HARDENED_INJECTION, SIDECAR}


@pytest.mark.parametrize("item", SWITCHING, ids=ids(SWITCHING))
def test_the_token_is_unreadable_by_shells_that_run_as_another_user(
    item: tuple[str, str, dict[str, Any], dict[str, Any]],
) -> None:
    file, name, spec, container = item
    mount = mount_at(container, str(PurePosixPath(setting(container, "access_token_file") or "/").parent))
    assert mount is not None
    secret = volume(spec, mount["name"])["secret"]
    modes = [secret.get("defaultMode", 0o644)] + [i["mode"] for i in secret.get("items", []) if "mode" in i]
    assert all(mode & 0o077 == 0 for mode in modes), (
        f"{file}: {name}: the token file is readable by group or others ({[oct(m) for m in modes]}): "
        "the shells could read it"
    )


def test_the_walk_through_names_only_manifests_and_pods_that_exist() -> None:
    text = "\n".join(page.read_text() for page in WALK_THROUGH)
    files = set(re.findall(r"deploy/kubernetes/([\w.-]+\.ya?ml)", text))
    assert files, "the walk-through applies no manifest"
    assert not [f for f in files if not (DEPLOY / f).is_file()], files
    names = {(doc["kind"], doc["metadata"]["name"]) for _, doc in documents()}
    for kind, name in re.findall(r"\b(pod|svc|service)/([a-z0-9][a-z0-9.-]*)", text):
        wanted = "Pod" if kind == "pod" else "Service"
        assert (wanted, name) in names, f"the walk-through names {kind}/{name}, which no manifest defines"


def test_the_deploy_readme_links_resolve() -> None:
    readme = DEPLOY / "README.md"
    for target in re.findall(r"\[[^\]]*\]\(([^)\s#]+)(?:#[^)\s]*)?\)", readme.read_text()):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):
            assert (readme.parent / target).resolve().exists(), f"deploy/kubernetes/README.md: broken link {target}"


# --- the Dockerfile ------------------------------------------------------------------------------


def test_the_image_is_built_in_two_stages_and_ships_no_python() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "the image is not multi-stage"
    assert re.match(r"python:3\.11-slim-bookworm\b", stages[0].image), (
        "the bundle is built on bookworm (glibc 2.36): that is the glibc docs/operations.md promises"
    )
    final = stages[-1]
    assert "python" not in final.image.split(":")[0], f"the final stage is based on {final.image}"
    for keyword, rest in final.instructions:
        assert not re.search(r"\bpip\b|apt-get install[^&]*\bpython3?\b", rest), f"{keyword} {rest}"


def test_the_build_stage_makes_the_bundle_with_scripts_bundle() -> None:
    build = dockerfile_stages()[0]
    assert any(re.search(r"\bscripts/bundle --out \S+", run) for run in build.all("RUN")), build.all("RUN")


def test_the_entrypoint_is_the_bundle_binary_copied_from_the_build_stage() -> None:
    stages = dockerfile_stages()
    assert PurePosixPath(entrypoint()[0]).name == "execd" and entrypoint()[1:] == ["serve"], entrypoint()
    copies = [shlex.split(rest) for rest in stages[-1].all("COPY")]
    assert [c for c in copies if c[0] == f"--from={stages[0].name}" and c[-1].rstrip("/") == bundle_dir()], (
        f"nothing copies the bundle from stage {stages[0].name} to {bundle_dir()}"
    )


def test_the_shells_run_as_a_non_root_user_created_in_the_image() -> None:
    final = dockerfile_stages()[-1]
    user = final.env().get(Settings.env_name("run_as"))
    assert user and user not in ("root", "0"), f"EXECD_RUN_AS is {user!r}"
    created = [
        run for run in final.all("RUN") if re.search(rf"\buseradd\b[^&]*--uid (\d+)[^&]*\s{re.escape(user)}(\s|$)", run)
    ]
    assert created, f"the image does not create the user {user}"
    uid = re.search(r"--uid (\d+)", created[0])
    assert uid and int(uid.group(1)) != 0
    assert final.env().get(Settings.env_name("host")) == "0.0.0.0"


def healthcheck() -> list[str]:
    (rest,) = dockerfile_stages()[-1].all("HEALTHCHECK")
    command = json.loads(rest[rest.index("CMD") + 3 :].strip())
    assert isinstance(command, list)
    return command


def test_the_healthcheck_needs_no_python() -> None:
    command = healthcheck()
    assert "python" not in " ".join(command) and command[0] == "bash", command
    assert "/healthz" in " ".join(command)


def _health(port: int) -> int:
    """The HEALTHCHECK's command, as Docker runs it (its argv, the image's EXECD_PORT)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "EXECD_PORT": str(port)}
    return subprocess.run(healthcheck(), env=env, capture_output=True, timeout=20).returncode


def test_the_healthcheck_passes_on_a_running_daemon_and_fails_on_a_closed_port() -> None:
    # The daemon in a subprocess: an in-process one, a subreaper, would reap the check's exit status.
    with served("--log-level", "error") as daemon:
        assert _health(daemon.port) == 0
        assert _health(free_port()) != 0


def test_the_docker_context_keeps_what_the_build_stage_copies() -> None:
    patterns = [
        line.strip().lstrip("/").rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]
    for stage in dockerfile_stages():
        for rest in stage.all("COPY"):
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            if any(w.startswith("--from") for w in shlex.split(rest)):
                continue
            for source in words[:-1]:
                excluded = [p for p in patterns if fnmatch.fnmatch(source.rstrip("/"), p)]
                assert not excluded, f"COPY {source}: excluded from the context by .dockerignore {excluded}"
                assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
