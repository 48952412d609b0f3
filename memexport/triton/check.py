"""``triton-repo --check``: a Triton model repository checked offline, as Triton would load it and more.

Every ``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` message
(``tritonclient.grpc.model_config_pb2``), which catches misspelt fields, bad enums and wrong
types. Then what the parser cannot know: folder names against ``name``, the version folders Triton
serves (its ``version_policy``: the latest by default) and the files each back end loads from them, ``max_batch_size`` and preferred batch sizes, ensemble
steps whose map keys must name the step model's real tensors and whose connected tensors must
agree, and dims against the artifact's own graph (read from the copy in the version folder).
Each problem is one line naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memexport.core.errors import MemexportError
from memexport.triton import schema

PURPOSE = "checking a Triton config.pbtxt"

# The file each back end loads from a version folder when ``default_model_filename`` is not set.
DEFAULT_FILES = {"onnxruntime": "model.onnx", "openvino": "model.xml", "tensorrt": "model.plan", "python": "model.py"}


class ModelRepositoryError(MemexportError):
    """A Triton model repository that Triton would refuse or that does not match its artifacts.

    Attributes:
        problems: Every problem found, one line each (the message is the first).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


def parse_config(path: Path) -> Any:
    """``config.pbtxt`` parsed into Triton's ``ModelConfig``.

    Raises:
        ModelRepositoryError: One line with the file, line, column and the parser's message.
    """
    text_format = schema.text_format(PURPOSE)
    try:
        return schema.parse(path.read_text(encoding="utf-8"), PURPOSE)
    except text_format.ParseError as error:
        raise ModelRepositoryError([f"{path}:{error}; fix the field name or value (see Triton's model_config.proto)"]) from None


def backend_of(config: Any) -> str:
    """``onnxruntime``, ``openvino``, ``tensorrt``, ``python`` or ``ensemble`` (platform names folded in)."""
    if config.platform == "ensemble":
        return "ensemble"
    if config.platform == "tensorrt_plan" or config.backend == "tensorrt":
        return "tensorrt"
    if config.platform == "onnxruntime_onnx":
        return "onnxruntime"
    return config.backend or config.platform


def tensors(config: Any, kind: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (data type, dims)}`` of a config's inputs or outputs (``kind``: ``input``/``output``)."""
    pb = schema.model_config_pb2(PURPOSE)
    return {t.name: (pb.DataType.Name(t.data_type), tuple(t.dims)) for t in getattr(config, kind)}


def load_repo(repo: Path) -> tuple[dict[str, Any], list[str]]:
    """Every model folder's parsed config, and the problems met reading them."""
    models, problems = {}, []
    if not repo.is_dir():
        raise ModelRepositoryError([f"{repo}: not a folder; pass the repository written by `memexport triton-repo`"])
    for folder in sorted(p for p in repo.iterdir() if p.is_dir()):
        path = folder / "config.pbtxt"
        if not path.is_file():
            problems.append(f"{folder}: no config.pbtxt; every model folder needs one")
            continue
        try:
            config = parse_config(path)
        except ModelRepositoryError as error:
            problems.extend(error.problems)
            models[folder.name] = None  # reported; ensembles using it are not checked further
            continue
        if config.name and config.name != folder.name:
            problems.append(f"{path}: name: {config.name!r} differs from its folder {folder.name!r}; Triton refuses the model: rename one")
        models[folder.name] = config
    if not models and not problems:
        problems.append(f"{repo}: no model folders; write one with `memexport triton-repo`")
    return models, problems


def served_versions(folder: Path, config: Any) -> list[Path]:
    """The version folders Triton serves, by the config's ``version_policy``: the latest one by default
    (``latest { num_versions: 1 }``), the latest N, all of them, or the ones named (numeric order)."""
    versions = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return versions
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [p for p in versions if int(p.name) in wanted]
    count = policy.latest.num_versions if choice == "latest" else 1
    return versions[-max(count, 1):] if versions else []


def version_problems(folder: Path, config: Any) -> list[str]:
    """Version folders exist, and each one Triton serves holds what its back end loads."""
    path = folder / "config.pbtxt"
    versions = served_versions(folder, config)
    if not versions:
        if any(p.is_dir() and p.name.isdigit() for p in folder.iterdir()):
            return [f"{path}: version_policy: serves no version folder of {folder}; fix the policy or add the version"]
        return [f"{folder}: no version folder (such as 1/); Triton loads nothing from this model"]
    backend = backend_of(config)
    if backend == "ensemble":
        return []
    name = "model.py" if backend == "python" else (config.default_model_filename or DEFAULT_FILES.get(backend, ""))
    problems = []
    for version in versions:
        model = version / name
        if name and not model.is_file():
            field = "default_model_filename" if config.default_model_filename and backend != "python" else "backend"
            problems.append(f"{path}: {field}: {backend} loads {model}, which is missing; copy the file there or fix the field")
        elif backend == "openvino" and not model.with_suffix(".bin").is_file():
            problems.append(f"{path}: default_model_filename: {model} has no {model.with_suffix('.bin').name} beside it; keep the IR pair together")
        elif backend == "onnxruntime":
            problems.extend(external_data_problems(path, model))
    return problems


def external_data_problems(path: Path, model: Path) -> list[str]:
    from memexport.runtime.integrity import external_data_locations

    return [
        f"{path}: default_model_filename: {model.name} keeps its weights in {location!r}, missing from {model.parent}; keep the ONNX and its data file together"
        for location in external_data_locations(model) if not (model.parent / location).is_file()
    ]


def batch_problems(path: Path, config: Any) -> list[str]:
    """``max_batch_size`` > 0 (images are batched as ``[1]`` rows) and preferred sizes within it."""
    if config.max_batch_size < 1:
        return [f"{path}: max_batch_size: {config.max_batch_size}; memexport's models batch rows, set it >= 1"]
    too_big = [s for s in config.dynamic_batching.preferred_batch_size if not 1 <= s <= config.max_batch_size]
    if too_big:
        return [f"{path}: dynamic_batching.preferred_batch_size: {too_big} outside 1..max_batch_size ({config.max_batch_size}); lower them"]
    return []


def step_problems(path: Path, index: int, step: Any, models: dict[str, Any], known: dict[str, tuple], dims: bool = True) -> list[str]:
    """One ensemble step: a real model, map keys naming its real tensors, values that exist and agree in dims."""
    where = f"{path}: ensemble_scheduling.step[{index}]"
    if step.model_name not in models:
        return [f"{where}.model_name: {step.model_name!r} is not a model folder in this repository; fix the name"]
    inputs, outputs = tensors(models[step.model_name], "input"), tensors(models[step.model_name], "output")
    problems = []
    for key, value in step.input_map.items():
        if key not in inputs:
            problems.append(f"{where}.input_map: key {key!r} is not an input of {step.model_name!r} (inputs: {', '.join(inputs)}); fix the key")
        elif value not in known:
            problems.append(f"{where}.input_map: value {value!r} is neither an ensemble input nor an earlier step's output; fix the value")
        elif dims and known[value][1] != inputs[key][1]:
            problems.append(f"{where}.input_map: {value!r} has dims {list(known[value][1])} but {step.model_name!r} input {key!r} "
                            f"takes {list(inputs[key][1])}; make the dims agree")
    for key, value in step.output_map.items():
        if key not in outputs:
            problems.append(f"{where}.output_map: key {key!r} is not an output of {step.model_name!r} (outputs: {', '.join(outputs)}); fix the key")
        else:
            known[value] = outputs[key]
    return problems


def ensemble_problems(path: Path, config: Any, models: dict[str, Any], faulty: frozenset[str] = frozenset()) -> list[str]:
    """Every step checked in order, then every ensemble output produced with the dims it declares.

    Dims are compared only when no step model has problems of its own (``faulty``): a dim edited in
    a step's config is reported there once, not again for each ensemble using it.
    """
    dims = not any(step.model_name in faulty for step in config.ensemble_scheduling.step)
    known = dict(tensors(config, "input"))
    if any(step.model_name in models and models[step.model_name] is None for step in config.ensemble_scheduling.step):
        return []  # a step's own config does not parse: that is the one problem to fix first
    problems = []
    for index, step in enumerate(config.ensemble_scheduling.step):
        problems.extend(step_problems(path, index, step, models, known, dims))
    for name, (_, shape) in tensors(config, "output").items():
        if name not in known:
            problems.append(f"{path}: output: {name!r} is produced by no step's output_map; map a step output to it")
        elif dims and known[name][1] != shape:
            problems.append(f"{path}: output: {name!r} declares dims {list(shape)} but its step produces {list(known[name][1])}; make them agree")
    return problems


def artifacts_of(folder: Path, config: Any) -> list[Path]:
    """The artifact a model serves, in each version folder Triton serves (none: an ensemble or preprocessing)."""
    from memexport.runtime.triton_python import ARTIFACT_KEY

    backend = backend_of(config)
    if backend == "ensemble":
        return []
    if backend == "python":
        name = config.parameters[ARTIFACT_KEY].string_value if ARTIFACT_KEY in config.parameters else ""
    else:
        name = config.default_model_filename or DEFAULT_FILES.get(backend, "")
    return [version / name for version in served_versions(folder, config)] if name else []


def served_dims(tensor: Any) -> tuple[int, ...]:
    """The dims the model itself has: ``reshape.shape`` where the config reshapes, else ``dims``."""
    return tuple(tensor.reshape.shape) if tensor.HasField("reshape") else tuple(tensor.dims)


def artifact_problems(path: Path, config: Any, artifact: Path) -> list[str]:
    """The scoring model's input and output against the artifact's own graph and metadata."""
    from memexport.triton.artifacts import artifact_facts

    try:
        facts = artifact_facts(artifact)
    except MemexportError as error:
        return [f"{path}: {error}"]
    meta, problems, served = facts.metadata, [], f"{artifact.parent.name}/{artifact.name}"
    for kind, name, want in (("input", meta.input_name, facts.input_dims), ("output", meta.output_name, facts.output_dims)):
        found = {t.name: t for t in getattr(config, kind)}
        if name not in found:
            problems.append(f"{path}: {kind}: no tensor named {name!r}, the {kind} of {served} (config has {', '.join(found) or 'none'}); rename it")
        elif found[name].data_type != schema.model_config_pb2(PURPOSE).TYPE_FP32:
            problems.append(f"{path}: {kind} {name!r} data_type: memexport artifacts take and give FP32 (FP16 and INT8 ones too); use TYPE_FP32")
        elif served_dims(found[name]) != want:
            problems.append(f"{path}: {kind} {name!r} dims: {list(served_dims(found[name]))} but {served} has {list(want)} "
                            "(without the batch dimension); use the artifact's dims")
    limit = facts.notes.get("MEMEXPORT_MAX_BATCH")
    if limit is not None and config.max_batch_size > int(limit):
        problems.append(f"{path}: max_batch_size: {config.max_batch_size} exceeds the engine profile's {limit}; lower it or rebuild the engine")
    return problems


def preprocess_problems(path: Path, config: Any) -> list[str]:
    """The preprocessing model: ``TYPE_STRING`` ``[1]`` in, the preprocessing's CHW out."""
    from memexport.core.spec import PreprocessSpec
    from memexport.runtime.triton_python import PREPROCESS_KEY

    spec = PreprocessSpec.from_json(config.parameters[PREPROCESS_KEY].string_value)
    problems = [f"{path}: input {name!r}: {kind} {list(shape)}; image rows are TYPE_STRING [1]"
                for name, (kind, shape) in tensors(config, "input").items() if (kind, shape) != ("TYPE_STRING", (1,))]
    want = (len(spec.mode), spec.crop, spec.crop)
    problems += [f"{path}: output {name!r} dims: {list(shape)} but the preprocessing makes {list(want)}; use {list(want)}"
                 for name, (_, shape) in tensors(config, "output").items() if shape != want]
    return problems


def find_problems(repo: Path | str) -> tuple[list[str], list[str]]:
    """Check a repository; returns ``(models checked, problems)``, one line per problem."""
    from memexport.runtime.triton_python import PREPROCESS_KEY

    repo = Path(repo)
    models, problems = load_repo(repo)
    faulty = set()
    # Ensembles last: they are checked knowing which of their steps have problems of their own.
    for name, config in sorted(models.items(), key=lambda item: item[1] is not None and backend_of(item[1]) == "ensemble"):
        if config is None:
            continue
        folder, path = repo / name, repo / name / "config.pbtxt"
        found = version_problems(folder, config) + batch_problems(path, config)
        if backend_of(config) == "ensemble":
            found += ensemble_problems(path, config, models, frozenset(faulty))
        elif PREPROCESS_KEY in config.parameters:
            found += preprocess_problems(path, config)
        for artifact in artifacts_of(folder, config):
            if artifact.is_file():
                found += artifact_problems(path, config, artifact)
        faulty.update([name] if found else [])
        problems += found
    return [name for name, config in models.items() if config is not None], problems


def check_triton_repo(repo: Path | str) -> list[str]:
    """Check a Triton model repository offline (parse, then the cross-checks the parser does not do).

    Args:
        repo: The repository folder.

    Returns:
        The names of the models checked.

    Raises:
        ModelRepositoryError: With every problem, one line each naming the file and the field.
        BackendUnavailableError: ``tritonclient[grpc]`` (the config parser) is not installed.
    """
    models, problems = find_problems(repo)
    if problems:
        raise ModelRepositoryError(problems)
    return models
