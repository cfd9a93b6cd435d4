"""The side server's OpenAPI 3.1 document (/openapi.json) and a self-contained page at /docs.

The old FastAPI service had Swagger UI at /docs. Its assets come from a CDN, which clusters without
egress cannot reach, so /docs here is one small HTML page that renders /openapi.json itself and can
send a file to POST /infer when that endpoint is enabled.
"""

from __future__ import annotations

from typing import Any

from consumer.events import InferResponse
from consumer.metrics import package_version

_JSON = "application/json"


def _json_response(description: str, schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": schema}
    if example is not None:
        content["example"] = example
    return {"description": description, "content": {_JSON: content}}


_DETAIL = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}

_HEALTH = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["healthy", "unavailable"]},
        "model_loaded": {"type": "boolean"},
        "processor_loaded": {"type": "boolean"},
        "device": {"type": ["string", "null"], "description": "null while the model loads"},
        "model_load_time": {"type": ["number", "null"], "description": "seconds"},
        "model": {"type": "string"},
        "adapter": {"type": ["string", "null"]},
        "adapters": {
            "type": ["array", "null"],
            "items": {"type": "string"},
            "description": "the adapter names an event may give: default (ADAPTER_PATH), then ADAPTERS; null while the "
            "model loads",
        },
        "dtype": {"type": ["string", "null"]},
        "warmup_time": {"type": ["number", "null"], "description": "seconds; null until warm"},
        "group": {"type": "string"},
        "in_group": {"type": "boolean"},
        "broker_ok": {"type": "boolean"},
        "assigned_partitions": {"type": "array", "items": {"type": "string"}},
        "paused_partitions": {"type": "array", "items": {"type": "string"}},
        "waiting_partitions": {
            "type": "array",
            "items": {"type": "string"},
            "description": "retry-topic partitions paused until their next record is due (RETRY_DELAYS)",
        },
        "last_poll_age_seconds": {"type": ["number", "null"]},
    },
    "required": ["status", "model_loaded", "processor_loaded", "device", "model_load_time"],
}

# The /infer answer's schema comes from the model that builds the answer, so the two cannot drift.
_INFER_RESULT = InferResponse.model_json_schema(ref_template="#/components/schemas/{model}")
_COMPONENTS = _INFER_RESULT.pop("$defs", {})


def openapi_document(infer_enabled: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the side server as configured (POST /infer only when enabled)."""
    paths: dict[str, Any] = {
        "/": {
            "get": {
                "summary": "Service information",
                "responses": {"200": _json_response("topics, model, endpoints", {"type": "object"})},
            }
        },
        "/health": {
            "get": {
                "summary": "Readiness: 200 when the model is loaded and warmed and the consumer is in its group",
                "responses": {
                    "200": _json_response("ready", _HEALTH),
                    "503": _json_response("not ready (loading, warming up, not in the group, stopping)", _HEALTH),
                },
            }
        },
        "/health/live": {
            "get": {
                "summary": "Liveness: 503 when the poll loop has made no progress for LIVENESS_TIMEOUT seconds",
                "responses": {
                    "200": _json_response("alive (or still starting)", {"type": "object"}),
                    "503": _json_response("the poll loop is stalled", {"type": "object"}),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                "responses": {
                    "200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json_response("OpenAPI 3.1", {"type": "object"})}}
        },
        "/docs": {
            "get": {
                "summary": "This document as a page",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
            }
        },
    }
    if infer_enabled:
        paths["/infer"] = {
            "post": {
                "summary": "Describe one diagram image (the old HTTP service's endpoint; INFER_ENDPOINT=true)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {"file": {"type": "string", "format": "binary"}},
                                "required": ["file"],
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json_response("the description and its metadata", _INFER_RESULT),
                    "400": _json_response("no file field, or not an acceptable image", _DETAIL),
                    "413": _json_response("the image is over IMAGE_MAX_BYTES", _DETAIL),
                    "500": _json_response("the model failed on this image", _DETAIL),
                    "503": _json_response("the model is not warm yet", _DETAIL),
                },
            }
        }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "diagram-consumer side server",
            "version": package_version(),
            "description": "Health, metrics and (optionally) the old POST /infer of the Kafka diagram consumer.",
        },
        "paths": paths,
    }
    if infer_enabled:
        document["components"] = {"schemas": _COMPONENTS}
    return document


DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>diagram-consumer API</title>
<style>
 body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }
 h1 { font-size: 1.4rem; } code, pre { font: 13px ui-monospace, monospace; }
 details { border: 1px solid #ccc; border-radius: 6px; margin: .6rem 0; padding: .4rem .8rem; }
 summary { cursor: pointer; } .method { display: inline-block; min-width: 4rem; font-weight: bold; }
 .get { color: #0a6; } .post { color: #06c; } pre { background: #f6f6f6; padding: .6rem; overflow: auto; }
</style>
</head>
<body>
<h1 id="title">diagram-consumer API</h1>
<p id="about"></p>
<p>Machine-readable: <a href="openapi.json">openapi.json</a></p>
<div id="paths">loading openapi.json&hellip;</div>
<script>
const text = (tag, value, cls) => { const e = document.createElement(tag); e.textContent = value; if (cls) e.className = cls; return e; };
fetch("openapi.json").then(r => r.json()).then(spec => {
  document.getElementById("title").textContent = spec.info.title + " " + spec.info.version;
  document.getElementById("about").textContent = spec.info.description || "";
  const root = document.getElementById("paths"); root.textContent = "";
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const box = document.createElement("details");
      const head = document.createElement("summary");
      head.append(text("span", method.toUpperCase(), "method " + method), text("code", path), " ", op.summary || "");
      box.append(head);
      if (op.requestBody) box.append(text("h4", "Request body"), text("pre", JSON.stringify(op.requestBody.content, null, 1)));
      box.append(text("h4", "Responses"));
      for (const [code, response] of Object.entries(op.responses)) {
        box.append(text("p", code + ": " + response.description));
        const media = Object.values(response.content || {})[0];
        if (media && media.schema) box.append(text("pre", JSON.stringify(media.schema, null, 1)));
      }
      if (method === "get") {
        const link = document.createElement("a"); link.href = path.replace(/^\\//, "") || "."; link.textContent = "open " + path;
        box.append(link);
      }
      if (path === "/infer" && method === "post") {
        const form = document.createElement("form"); const input = document.createElement("input");
        input.type = "file"; input.name = "file"; input.accept = "image/*";
        const send = text("button", "Describe"); const out = text("pre", "");
        form.append(input, send); box.append(form, out);
        form.onsubmit = async (event) => {
          event.preventDefault(); out.textContent = "running the model...";
          const body = new FormData(); body.append("file", input.files[0]);
          const response = await fetch("infer", { method: "POST", body });
          out.textContent = response.status + "\\n" + JSON.stringify(await response.json(), null, 2);
        };
      }
      root.append(box);
    }
  }
}).catch(error => { document.getElementById("paths").textContent = "cannot read openapi.json: " + error; });
</script>
</body>
</html>
"""
