"""docker/ and docker-compose.yml, checked statically: no Docker engine runs on these machines, so
these tests catch what `docker compose up` would otherwise only reveal on a user's laptop — a
missing Dockerfile or stage, a command the CLI does not have, a misspelt TT_ setting, a service
without a healthcheck."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops._static import compose_env, effective, env_names, exec_form, parse_dockerfile, stage_chain
from tests.ops._tools import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
OUR_SERVICES = ["api", "train", "reindex", "api-gpu"]


def known_tt_variables() -> set[str]:
    from service.settings import Settings

    return {f"TT_{name.upper()}" for name in Settings.model_fields}


def assert_valid_cli(argv: list[str], where: str) -> None:
    """The argv (after the `twotower` entrypoint) parses with the real CLI, subcommand and flags."""
    from twotower.cli import build_parser

    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on an unknown subcommand or flag, 0 for --help
        assert exc.code == 0, f"{where}: `twotower {' '.join(argv)}` is not a valid command line"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def build_of(service: dict[str, Any]) -> tuple[Path, Path, str | None]:
    build = service["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = (REPO_ROOT / build.get("context", ".")).resolve()
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    return context, dockerfile, build.get("target")


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("redis", "api", "train", "reindex"):
        assert name in services, f"docker-compose.yml has no `{name}` service"
    # the jobs are opt-in: `up` starts only redis + api
    assert "train" in services["train"]["profiles"]
    assert "reindex" in services["reindex"]["profiles"]
    assert "profiles" not in services["api"] and "profiles" not in services["redis"]


def test_api_waits_for_a_healthy_redis_and_serves_on_8000(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["redis"]["healthcheck"]["test"], "redis needs a healthcheck for depends_on to wait on"
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(str(p).split(":")[-1] == "8000" for p in services["api"]["ports"])
    assert services["api"]["healthcheck"]["test"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_jobs_and_api_share_the_artifacts_volume(compose: dict[str, Any]) -> None:
    assert "artifacts" in compose["volumes"]
    for name in ("api", "train", "reindex"):
        mounts = [str(v) for v in compose["services"][name]["volumes"]]
        assert "artifacts:/artifacts" in mounts, f"{name} does not mount the artifacts volume"
        env = compose_env(compose["services"][name])
        assert env.get("TT_ARTIFACTS") == "/artifacts"


def test_redis_urls_point_at_the_compose_redis(compose: dict[str, Any]) -> None:
    for name in OUR_SERVICES:
        url = compose_env(compose["services"][name]).get("TT_REDIS_URL")
        assert url and url.startswith("redis://redis:6379"), f"{name}: TT_REDIS_URL={url!r}"


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_every_build_context_dockerfile_and_target_exists(compose: dict[str, Any], name: str) -> None:
    context, dockerfile, target = build_of(compose["services"][name])
    assert context.is_dir(), f"{name}: build context {context} does not exist"
    assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
    stages = parse_dockerfile(dockerfile)
    if target is not None:
        assert target in {s.name for s in stages}, f"{name}: {dockerfile.name} has no stage {target!r}"


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_compose_environment_uses_only_real_settings(compose: dict[str, Any], name: str) -> None:
    unknown = set(compose_env(compose["services"][name])) - known_tt_variables()
    assert not unknown, f"{name}: {sorted(unknown)} are not fields of service.settings.Settings"


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_compose_commands_are_real_cli_commands(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    _, dockerfile, target = build_of(service)
    entry = effective(parse_dockerfile(dockerfile), target, "ENTRYPOINT")
    assert entry is not None and exec_form(entry) == ["twotower"], f"{name}: entrypoint is not twotower"
    command = service["command"]
    assert isinstance(command, list), f"{name}: use the list form of `command`"
    assert_valid_cli(command, f"docker-compose.yml service {name}")


DOCKERFILES = sorted(p.name for p in (REPO_ROOT / "docker").glob("Dockerfile*") if not p.name.endswith(".dockerignore"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_commands_env_and_copies_are_real(name: str) -> None:
    path = REPO_ROOT / "docker" / name
    stages = parse_dockerfile(path)
    known = known_tt_variables()
    for stage in stages:
        for ins in stage.all("ENV"):
            bad = [v for v in env_names(ins) if v.startswith("TT_") and v not in known]
            assert not bad, f"{name}:{ins.line}: {bad} are not fields of service.settings.Settings"
        for ins in stage.all("CMD"):
            assert_valid_cli(exec_form(ins), f"{name}:{ins.line}")
        for ins in stage.all("COPY"):
            if "--from=" in ins.args:
                continue
            *sources, _dest = ins.args.split()
            for src in sources:
                assert (REPO_ROOT / src).exists(), f"{name}:{ins.line}: COPY source {src} is not in the repo"
                assert _sent_to_docker(path, src), f"{name}:{ins.line}: {src} is excluded by the .dockerignore"


def _sent_to_docker(dockerfile: Path, src: str) -> bool:
    """Whether the Dockerfile's own .dockerignore (last matching rule wins) lets `src` into the context."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.exists():
        return True
    included = True
    for raw in ignore.read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(src.rstrip("/"), pattern):
            included = negate
    return included


@pytest.mark.parametrize("name,target", [("Dockerfile", "api"), ("Dockerfile", None), ("Dockerfile.gpu", None)])
def test_api_images_have_a_healthcheck_and_run_as_non_root(name: str, target: str | None) -> None:
    stages = parse_dockerfile(REPO_ROOT / "docker" / name)
    health = effective(stages, target, "HEALTHCHECK")
    assert health is not None and "/healthz" in health.args, f"{name} ({target}): no /healthz HEALTHCHECK"
    user = effective(stages, target, "USER")
    assert user is not None and user.args not in ("root", "0"), f"{name} ({target}): runs as root"
    cmd = effective(stages, target, "CMD")
    assert cmd is not None and exec_form(cmd)[0] == "serve"
    assert any(s.all("EXPOSE") and "8000" in s.all("EXPOSE")[0].args for s in stage_chain(stages, target))


def test_cpu_image_is_slim_and_never_installs_cuda_torch() -> None:
    stages = parse_dockerfile(REPO_ROOT / "docker" / "Dockerfile")
    names = {s.name for s in stages}
    external = [s.base for s in stages if s.base not in names]
    assert external and all(b.startswith("python:") and b.endswith("-slim") for b in external), external
    runs = " ".join(i.args for s in stages for i in s.all("RUN"))
    assert "+cpu" in runs and "whl/cpu" in " ".join(i.args for s in stages for i in s.all("ARG"))
    assert {"api", "jobs"} <= {s.name for s in stages}


def test_gpu_image_has_cuda12_faiss_gpu_and_cuda_torch() -> None:
    stages = parse_dockerfile(REPO_ROOT / "docker" / "Dockerfile.gpu")
    args = " ".join(i.args for s in stages for i in s.all("ARG"))
    text = (REPO_ROOT / "docker" / "Dockerfile.gpu").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base and base.group(1).startswith("nvidia/cuda:12.") and "-runtime-" in base.group(1)
    assert stages[0].base == "${CUDA_IMAGE}"
    assert "faiss-gpu" in args and "pip uninstall -y faiss-cpu" in text
    assert "+cpu" not in text and "whl/cu12" in args
