"""Build UI-format ComfyUI workflows (what the editor saves and Browse Templates opens) in code.

Widget values are laid out from the server's `/object_info` (defaults, order, the extra
"control_after_generate" value after seeds), so a workflow written here loads in the editor with
every widget where the node expects it, and `workflow_api.convert` reads it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from workflow_api import widget_inputs

NODE_WIDTH = 320
ROW = 24           # height of one socket or widget row in the editor
TITLE = 30


@dataclass
class Node:
    id: int
    type: str
    pos: list
    title: str | None
    widgets: dict
    inputs: list = field(default_factory=list)    # UI input entries
    outputs: list = field(default_factory=list)   # UI output entries
    size: list | None = None
    mode: int = 0
    extra: dict = field(default_factory=dict)     # e.g. color

    def out(self, name_or_index):
        return (self, name_or_index)


class Graph:
    def __init__(self, object_info: dict):
        self.object_info = object_info
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    # ---- nodes -------------------------------------------------------------------------------
    def add(self, class_type: str, pos, title: str | None = None, mode: int = 0, **widgets) -> Node:
        if class_type not in self.object_info:
            raise KeyError(f"the server has no node {class_type!r}")
        info = self.object_info[class_type]
        known = {name for name, _ in widget_inputs(info)}
        unknown = set(widgets) - known
        if unknown:
            raise KeyError(f"{class_type} has no widget {sorted(unknown)}; widgets: {sorted(known)}")
        node = Node(id=len(self.nodes) + 1, type=class_type, pos=list(pos), title=title, widgets=widgets, mode=mode)
        spec = info.get("input", {})
        for kind in ("required", "optional"):
            for name, entry in spec.get(kind, {}).items():
                if name not in known:
                    node.inputs.append({"name": name, "type": _type_name(entry[0]), "link": None,
                                        **({"shape": 7} if kind == "optional" else {})})
        for i, out_type in enumerate(info.get("output", [])):
            names = info.get("output_name") or info.get("output", [])
            entry = {"name": names[i], "type": _type_name(out_type), "links": [], "slot_index": i}
            if (info.get("output_is_list") or [False] * (i + 1))[i]:
                entry["shape"] = 6  # the editor's grid shape for list outputs
            node.outputs.append(entry)
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size=(420, 200), title: str = "Read me") -> Node:
        node = Node(id=len(self.nodes) + 1, type="MarkdownNote", pos=list(pos), title=title, widgets={},
                    size=list(size), extra={"color": "#432", "bgcolor": "#653"})
        node.raw_widgets = [text]
        self.nodes.append(node)
        return node

    def group(self, title: str, bounding, color="#3f789e"):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding),
                            "color": color, "font_size": 24, "flags": {}})

    def connect(self, source: tuple, target: Node, input_name: str) -> None:
        origin, which = source
        if isinstance(which, str):
            names = [o["name"] for o in origin.outputs]
            if which not in names:
                raise KeyError(f"{origin.type} has no output {which!r}; outputs: {names}")
            slot = names.index(which)
        else:
            slot = which
        target_slot = next((i for i, inp in enumerate(target.inputs) if inp["name"] == input_name), None)
        if target_slot is None:  # a widget turned into an input socket
            info = self.object_info[target.type]
            entry = info["input"].get("required", {}).get(input_name) or info["input"].get("optional", {}).get(input_name)
            if entry is None:
                raise KeyError(f"{target.type} has no input {input_name!r}")
            target.inputs.append({"name": input_name, "type": _type_name(entry[0]), "link": None,
                                  "widget": {"name": input_name}})
            target_slot = len(target.inputs) - 1
        link_id = len(self.links) + 1
        link_type = origin.outputs[slot]["type"]
        self.links.append([link_id, origin.id, slot, target.id, target_slot, link_type])
        origin.outputs[slot]["links"].append(link_id)
        target.inputs[target_slot]["link"] = link_id

    # ---- serialisation -----------------------------------------------------------------------
    def widget_values(self, node: Node) -> list:
        if hasattr(node, "raw_widgets"):
            return node.raw_widgets
        info = self.object_info[node.type]
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        values = []
        for name, width in widget_inputs(info):
            entry = spec[name]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if name in node.widgets:
                value = node.widgets[name]
            elif "default" in options:
                value = options["default"]
            elif isinstance(entry[0], list):
                value = entry[0][0] if entry[0] else ""
            elif entry[0] == "COMBO":
                value = (options.get("options") or [""])[0]
            else:
                value = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[entry[0]]
            values.append(value)
            values.extend(["fixed"] * (width - 1) if width > 1 and not _is_upload(options) else
                          ["image"] * (width - 1))
        return values

    def to_ui(self) -> dict:
        order = self._execution_order()
        nodes = []
        for node in self.nodes:
            n_widgets = 0 if hasattr(node, "raw_widgets") else self._widget_rows(node)
            sockets = max(len([i for i in node.inputs if "widget" not in i]), len(node.outputs))
            size = node.size or [NODE_WIDTH, TITLE + ROW * (sockets + n_widgets) + 10]
            entry = {"id": node.id, "type": node.type, "pos": node.pos, "size": size, "flags": {},
                     "order": order[node.id], "mode": node.mode, "inputs": node.inputs, "outputs": node.outputs,
                     "properties": {"Node name for S&R": node.type} if node.type != "MarkdownNote" else {},
                     "widgets_values": self.widget_values(node)}
            if node.title:
                entry["title"] = node.title
            entry.update(node.extra)
            nodes.append(entry)
        return {"id": "00000000-0000-4000-8000-000000000000", "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": nodes, "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}

    def _widget_rows(self, node: Node) -> int:
        """Editor rows the visible widgets take: advanced ones start hidden, multiline text takes 4."""
        info = self.object_info[node.type]
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        rows = 0
        for name, _ in widget_inputs(info):
            options = spec[name][1] if len(spec[name]) > 1 and isinstance(spec[name][1], dict) else {}
            if not options.get("advanced"):
                rows += 4 if options.get("multiline") else 1
        return rows

    def _execution_order(self) -> dict:
        deps = {n.id: {self.links[i["link"] - 1][1] for i in n.inputs if i.get("link")} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = sorted(nid for nid, d in deps.items() if nid not in done and d <= done)
            if not ready:
                raise ValueError("the graph has a cycle")
            for nid in ready:
                order[nid] = len(order)
                done.add(nid)
        return order


def _type_name(input_type) -> str:
    return "COMBO" if isinstance(input_type, list) else input_type


def _is_upload(options: dict) -> bool:
    return any(options.get(flag) for flag in ("image_upload", "video_upload", "audio_upload",
                                              "animated_image_upload"))
