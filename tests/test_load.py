"""kpgen.inputs.manifests.load_documents: files, directories and stdin, YAML or JSON, into API
objects."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kpgen.inputs.manifests import InputError, load_documents


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def named(kind: str, name: str) -> str:
    """A small YAML object of ``kind``."""
    return f"apiVersion: v1\nkind: {kind}\nmetadata: {{name: {name}}}\n"


# --- what is read -----------------------------------------------------------------------


def test_multi_document_yaml_yields_every_document_in_order_without_empty_ones(tmp_path):
    text = (
        named("Service", "a") + "---\n---\n" + named("Pod", "b") + "---\n" + named("Service", "c")
    )
    docs = load_documents([write(tmp_path / "all.yaml", text)])
    assert docs == [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}},
    ]


def test_json_file_is_read_as_one_object(tmp_path):
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "a"},
        "spec": {"ports": [{"port": 80}]},
    }
    docs = load_documents([write(tmp_path / "svc.json", json.dumps(obj, indent=2))])
    assert docs == [obj]


def test_kind_list_is_unwrapped_and_its_items_keep_their_own_kind(tmp_path):
    text = (
        "apiVersion: v1\nkind: List\nitems:\n"
        "- {apiVersion: v1, kind: Service, metadata: {name: a}}\n"
        "- {apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: a-1}}\n"
    )
    docs = load_documents([write(tmp_path / "list.yaml", text)])
    assert docs == [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "a-1"}},
    ]


def test_service_list_items_without_kind_become_services_of_the_list_api_version(tmp_path):
    text = (
        "apiVersion: v1\nkind: ServiceList\nitems:\n- metadata: {name: a}\n- metadata: {name: b}\n"
    )
    docs = load_documents([write(tmp_path / "services.yaml", text)])
    assert docs == [
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "a"}},
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "b"}},
    ]


def test_endpoint_slice_list_in_json_gives_endpoint_slices(tmp_path):
    listing = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSliceList",
        "items": [{"metadata": {"name": "a-1"}, "addressType": "IPv4"}],
    }
    docs = load_documents([write(tmp_path / "slices.json", json.dumps(listing))])
    assert docs == [
        {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": "a-1"},
            "addressType": "IPv4",
        }
    ]


def test_list_nested_in_a_list_is_unwrapped_too(tmp_path):
    text = (
        "apiVersion: v1\nkind: List\nitems:\n"
        "- apiVersion: v1\n  kind: ServiceList\n  items:\n  - metadata: {name: inner}\n"
    )
    docs = load_documents([write(tmp_path / "nested.yaml", text)])
    assert docs == [{"kind": "Service", "apiVersion": "v1", "metadata": {"name": "inner"}}]


def test_directory_reads_only_yaml_yml_and_json_files_sorted_by_name(tmp_path):
    write(tmp_path / "c.yaml", named("Service", "from-c-yaml"))
    write(tmp_path / "a.yml", named("Service", "from-a-yml"))
    write(tmp_path / "b.json", json.dumps({"kind": "Service", "metadata": {"name": "from-b-json"}}))
    write(tmp_path / "notes.txt", named("Service", "from-txt"))
    write(tmp_path / "README", named("Service", "from-readme"))
    docs = load_documents([str(tmp_path)])
    assert [d["metadata"]["name"] for d in docs] == ["from-a-yml", "from-b-json", "from-c-yaml"]


def test_dash_reads_the_given_stdin_stream():
    docs = load_documents(["-"], stdin=io.StringIO(named("Service", "piped")))
    assert docs == [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "piped"}}]


def test_sources_are_read_in_the_order_given(tmp_path):
    first = write(tmp_path / "z.yaml", named("Service", "file-z"))
    last = write(tmp_path / "a.yaml", named("Service", "file-a"))
    docs = load_documents([first, "-", last], stdin=io.StringIO(named("Service", "stdin")))
    assert [d["metadata"]["name"] for d in docs] == ["file-z", "stdin", "file-a"]


def test_flow_style_yaml_that_is_not_json_is_read_as_yaml():
    docs = load_documents(["-"], stdin=io.StringIO("{kind: Service, metadata: {name: flow}}\n"))
    assert docs == [{"kind": "Service", "metadata": {"name": "flow"}}]


# --- what cannot be read: InputError, one line ------------------------------------------


def test_missing_file_is_an_input_error_naming_the_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(InputError) as caught:
        load_documents([missing])
    assert str(caught.value) == f"cannot read {missing}: No such file or directory"


def test_bad_yaml_is_an_input_error_naming_file_line_and_column(tmp_path):
    path = write(tmp_path / "bad.yaml", "apiVersion: v1\nkind: Service: x\n")
    with pytest.raises(InputError) as caught:
        load_documents([path])
    assert str(caught.value) == (
        f"{path}: invalid YAML at line 2, column 14: mapping values are not allowed in this context"
    )


def test_bad_yaml_after_good_documents_still_fails_the_whole_file(tmp_path):
    path = write(tmp_path / "bad.yaml", named("Service", "ok") + "---\nitems: [1\nx: 2\n")
    with pytest.raises(InputError) as caught:
        load_documents([path])
    assert (
        str(caught.value)
        == f"{path}: invalid YAML at line 6, column 2: illegal placement of ':' indicator"
    )


def test_bad_yaml_on_stdin_is_named_stdin():
    with pytest.raises(InputError) as caught:
        load_documents(["-"], stdin=io.StringIO("a:\n\t- b\n"))
    assert str(caught.value) == (
        "<stdin>: invalid YAML at line 2, column 2:"
        " tabs disallowed within this context (block indentation)"
    )


def test_truncated_json_is_an_input_error_with_a_position(tmp_path):
    path = write(tmp_path / "cut.json", '{"kind": "Service",')
    with pytest.raises(InputError) as caught:
        load_documents([path])
    assert str(caught.value) == f"{path}: invalid YAML at line 1, column 1: unclosed bracket '{{'"


def test_non_utf8_file_is_an_input_error_naming_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kind: Service\nmetadata: {name: caf\xe9}\n")
    with pytest.raises(InputError) as caught:
        load_documents([str(path)])
    assert str(caught.value) == f"cannot read {path}: not UTF-8 text"


def test_non_utf8_file_in_a_directory_is_named_in_the_error(tmp_path):
    write(tmp_path / "a.yaml", named("Service", "fine"))
    (tmp_path / "b.yaml").write_bytes(b"kind: Service\nmetadata: {name: caf\xe9}\n")
    with pytest.raises(InputError) as caught:
        load_documents([str(tmp_path)])
    assert str(caught.value) == f"cannot read {tmp_path / 'b.yaml'}: not UTF-8 text"


def test_subdirectory_named_like_a_manifest_is_not_read(tmp_path):
    write(tmp_path / "a.yaml", named("Service", "fine"))
    (tmp_path / "old.yaml").mkdir()
    docs = load_documents([str(tmp_path)])
    assert [d["metadata"]["name"] for d in docs] == ["fine"]


def test_non_utf8_stdin_is_an_input_error():
    stdin = io.TextIOWrapper(
        io.BytesIO(b"kind: Service\nmetadata: {name: caf\xe9}\n"), encoding="utf-8"
    )
    with pytest.raises(InputError) as caught:
        load_documents(["-"], stdin=stdin)
    assert str(caught.value) == "cannot read <stdin>: not UTF-8 text"


# --- YAML as kubectl and people write it -------------------------------------------------------


def test_a_top_level_list_document_is_one_document_not_several(tmp_path):
    """A stream of two documents and one document holding a list decode differently."""
    two = load_documents([write(tmp_path / "two.yaml", "kind: A\n---\nkind: B\n")])
    one = load_documents([write(tmp_path / "one.yaml", "- kind: A\n- kind: B\n")])
    assert two == [{"kind": "A"}, {"kind": "B"}]
    assert one == [[{"kind": "A"}, {"kind": "B"}]]


def test_document_markers_with_content_end_markers_and_a_byte_order_mark(tmp_path):
    text = "\ufeff--- {kind: A}\n...\n---\n# only a comment\n---\nkind: B\n"
    assert load_documents([write(tmp_path / "m.yaml", text)]) == [{"kind": "A"}, {"kind": "B"}]


def test_a_marker_like_line_inside_an_indented_block_scalar_is_content(tmp_path):
    text = "kind: A\ndata: |\n  ---\n  text\n---\nkind: B\n"
    docs = load_documents([write(tmp_path / "s.yaml", text)])
    assert docs == [{"kind": "A", "data": "---\ntext\n"}, {"kind": "B"}]


def test_merge_keys_are_expanded_and_the_mappings_own_keys_win(tmp_path):
    text = (
        "defaults: &port {protocol: UDP, port: 53}\n"
        "extra: &named {name: dns, port: 5353}\n"
        "ports:\n"
        "- <<: *port\n"
        "  port: 1053\n"
        "- <<: [*named, *port]\n"
    )
    (doc,) = load_documents([write(tmp_path / "merge.yaml", text)])
    assert doc["ports"] == [
        {"protocol": "UDP", "port": 1053},
        {"name": "dns", "port": 5353, "protocol": "UDP"},
    ]


def test_a_duplicate_key_takes_the_last_value_and_timestamps_stay_text(tmp_path):
    text = "kind: A\nkind: Service\nmetadata: {creationTimestamp: 2024-01-02T03:04:05Z}\n"
    (doc,) = load_documents([write(tmp_path / "d.yaml", text)])
    assert doc == {"kind": "Service", "metadata": {"creationTimestamp": "2024-01-02T03:04:05Z"}}


def test_an_error_in_a_later_document_counts_lines_from_the_start_of_the_file(tmp_path):
    text = "kind: A\n---\nkind: B\n---\nkind: [C\n"
    with pytest.raises(InputError) as caught:
        load_documents([write(tmp_path / "late.yaml", text)])
    assert str(caught.value).startswith(f"{tmp_path / 'late.yaml'}: invalid YAML at line 5, ")
