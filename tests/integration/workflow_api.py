"""Convert a UI-format ComfyUI workflow (what the editor saves: "nodes" + "links") into API format.

The UI file stores widget values as a positional list per node; which input each value belongs
to is only known from the node definitions the server publishes at `/object_info`. This follows
the front end's rules:
  - widget inputs are the combo / INT / FLOAT / STRING / BOOLEAN inputs (not `forceInput`),
    in the order of `input_order` (required, then optional);
  - an INT named `seed` / `noise_seed`, or any input whose options set `control_after_generate`,
    is followed by one extra saved value ("fixed", "randomize", ...) that is not an input;
  - a combo with `image_upload` / `video_upload` / `audio_upload` is followed by the upload
    button's saved value;
  - an input connected by a link takes the link, even when it is also a widget (converted widget);
  - frontend-only nodes: Note / MarkdownNote are dropped, Reroute is followed, PrimitiveNode
    gives its value to every input it feeds;
  - mode 2 (muted) nodes are dropped with their links; mode 4 (bypassed) nodes pass each output
    through from the first input of the same type.
Subgraphs are not supported (a clear error says so), nor V3 dynamic inputs (DynamicCombo,
Autogrow), which none of this pack's nodes use. Checked against the 72 core templates of
comfyui_workflow_templates that need no subgraph or API node: every widget value lands on an
input of its type except in the one DynamicCombo node (TextGenerate).
"""
from __future__ import annotations

import copy

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
MUTED, BYPASSED = 2, 4


class ConversionError(ValueError):
    pass


def widget_inputs(node_info: dict) -> list[tuple[str, int]]:
    """(input name, saved values it occupies) for each widget of a node, in saved order."""
    spec = node_info.get("input", {})
    order = node_info.get("input_order") or {kind: list(spec.get(kind, {})) for kind in ("required", "optional")}
    widgets = []
    for kind in ("required", "optional"):
        for name in order.get(kind, []):
            entry = spec.get(kind, {}).get(name)
            if entry is None:
                continue
            input_type = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            is_combo = isinstance(input_type, list) or input_type == "COMBO"
            if not (is_combo or input_type in WIDGET_TYPES) or options.get("forceInput"):
                continue
            extra = 0
            if options.get("control_after_generate") or (input_type == "INT" and name in ("seed", "noise_seed")):
                extra += 1
            if is_combo and any(options.get(flag) for flag in UPLOAD_FLAGS):
                extra += 1
            widgets.append((name, 1 + extra))
    return widgets


def _widget_values(node: dict, node_info: dict) -> dict:
    saved = node.get("widgets_values")
    if saved is None:
        return {}
    names = [name for name, _ in widget_inputs(node_info)]
    if isinstance(saved, dict):  # some packs save widgets by name
        return {k: v for k, v in saved.items() if k in names}
    values, i = {}, 0
    for name, width in widget_inputs(node_info):
        if i >= len(saved):
            break
        values[name] = saved[i]
        i += width
    return values


def convert(workflow: dict, object_info: dict) -> dict:
    """UI workflow -> API prompt ({node id: {"class_type", "inputs", "_meta"}})."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ConversionError("workflows with subgraphs are not supported by this converter")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # newer serialisation
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        else:
            link_id, origin, origin_slot, target, target_slot, link_type = link[:6]
            links[link_id] = (origin, origin_slot, target, target_slot, link_type)

    def resolve(link_id, seen=()):
        """Follow reroutes and bypassed nodes to the real source: ("link", [id, slot]) / ("value", v) / None."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        origin, origin_slot, _, _, link_type = links[link_id]
        source = nodes.get(origin)
        if source is None or source.get("mode") == MUTED:
            return None
        kind = source["type"]
        if kind == "Reroute":
            return resolve(source["inputs"][0].get("link"), seen + (link_id,))
        if kind == "PrimitiveNode":
            return ("value", (source.get("widgets_values") or [None])[0])
        if source.get("mode") == BYPASSED:
            out_type = source["outputs"][origin_slot]["type"] if origin_slot < len(source.get("outputs", [])) else link_type
            candidates = [inp for inp in source.get("inputs", []) if inp.get("type") == out_type]
            # the input at the same slot first, as the executor does, then the first one of the type
            same_slot = [inp for i, inp in enumerate(source.get("inputs", [])) if i == origin_slot and inp in candidates]
            for inp in same_slot + candidates:
                found = resolve(inp.get("link"), seen + (link_id,))
                if found is not None:
                    return found
            return None
        return ("link", [str(origin), origin_slot])

    prompt = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode") in (MUTED, BYPASSED):
            continue
        if kind not in object_info:
            raise ConversionError(f"node {node_id} has type {kind!r}, which the server does not know "
                                  "(missing custom node?)")
        info = object_info[kind]
        inputs = _widget_values(node, info)
        for inp in node.get("inputs", []):
            name = (inp.get("widget") or {}).get("name", inp["name"])
            source = resolve(inp.get("link"))
            if source is None:
                continue
            inputs[name] = source[1]
        title = node.get("title") or info.get("display_name") or kind
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}
    return prompt


def load_and_convert(path, object_info: dict) -> dict:
    import json
    with open(path) as f:
        return convert(json.load(f), object_info)


def nodes_of(prompt: dict, class_type: str) -> list[dict]:
    """Every node of a class in an API prompt (for tests that override inputs)."""
    return [node for node in prompt.values() if node["class_type"] == class_type]


def set_inputs(prompt: dict, class_type: str, **values) -> dict:
    """Set widget inputs on every node of a class; returns a changed copy. Fails if none match."""
    out = copy.deepcopy(prompt)
    matched = nodes_of(out, class_type)
    if not matched:
        raise KeyError(f"no {class_type} node in the prompt")
    for node in matched:
        node["inputs"].update(values)
    return out
