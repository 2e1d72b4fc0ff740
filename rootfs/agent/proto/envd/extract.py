#!/usr/bin/env python3
"""Recreate envd's .proto files from the descriptors embedded in the `e2b` PyPI package.

The e2b SDK's generated modules (`e2b/envd/**/*_pb.py`) each embed their serialized
`FileDescriptorProto` (the first argument of `file_desc(...)`). This script decodes them with
Google's `protobuf` package and prints equivalent .proto source, then checks the result by
compiling it again with `grpc_tools.protoc` and comparing descriptors.

    pip download e2b==2.63.0 --no-deps && unzip e2b-*.whl -d e2b
    pip install protobuf grpcio-tools
    python3 extract.py e2b/e2b/envd OUT_DIR
"""

import ast
import pathlib
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2

FDP = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    FDP.TYPE_DOUBLE: "double", FDP.TYPE_FLOAT: "float", FDP.TYPE_INT64: "int64",
    FDP.TYPE_UINT64: "uint64", FDP.TYPE_INT32: "int32", FDP.TYPE_FIXED64: "fixed64",
    FDP.TYPE_FIXED32: "fixed32", FDP.TYPE_BOOL: "bool", FDP.TYPE_STRING: "string",
    FDP.TYPE_BYTES: "bytes", FDP.TYPE_UINT32: "uint32", FDP.TYPE_SFIXED32: "sfixed32",
    FDP.TYPE_SFIXED64: "sfixed64", FDP.TYPE_SINT32: "sint32", FDP.TYPE_SINT64: "sint64",
}


def embedded_descriptor(py_file: pathlib.Path) -> bytes:
    tree = ast.parse(py_file.read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "file_desc"
                and isinstance(node.args[0], ast.Constant)):
            return node.args[0].value
    raise SystemExit(f"{py_file}: no file_desc(...) call")


def type_name(field) -> str:
    if field.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM):
        return field.type_name  # fully qualified, with a leading dot
    return SCALARS[field.type]


def render_enum(enum, indent):
    pad = "  " * indent
    lines = [f"{pad}enum {enum.name} {{"]
    for value in enum.value:
        lines.append(f"{pad}  {value.name} = {value.number};")
    lines.append(f"{pad}}}")
    return lines


def render_field(field, message, pad):
    label = ""
    if field.label == FDP.LABEL_REPEATED:
        label = "repeated "
    elif field.proto3_optional:
        label = "optional "
    if field.type == FDP.TYPE_MESSAGE:
        entry = next((n for n in message.nested_type
                      if "." + n.name == field.type_name[field.type_name.rfind("."):]
                      and n.options.map_entry), None)
        if entry is not None:
            key, value = entry.field
            return f"{pad}map<{type_name(key)}, {type_name(value)}> {field.name} = {field.number};"
    return f"{pad}{label}{type_name(field)} {field.name} = {field.number};"


def render_message(message, indent):
    pad = "  " * indent
    lines = [f"{pad}message {message.name} {{"]
    for nested in message.nested_type:
        if not nested.options.map_entry:
            lines += render_message(nested, indent + 1)
    for enum in message.enum_type:
        lines += render_enum(enum, indent + 1)
    real_oneofs = {}
    for field in message.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            real_oneofs.setdefault(field.oneof_index, []).append(field)
    emitted = set()
    for field in message.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            index = field.oneof_index
            if index in emitted:
                continue
            emitted.add(index)
            lines.append(f"{pad}  oneof {message.oneof_decl[index].name} {{")
            for member in real_oneofs[index]:
                lines.append(render_field(member, message, pad + "    "))
            lines.append(f"{pad}  }}")
        else:
            lines.append(render_field(field, message, pad + "  "))
    lines.append(f"{pad}}}")
    return lines


def render_file(fd, source: str) -> str:
    lines = [f"// Recreated by extract.py from {source} (descriptor embedded in the e2b",
             "// PyPI package); do not edit by hand.", "", f'syntax = "{fd.syntax or "proto2"}";',
             "", f"package {fd.package};", ""]
    for dep in fd.dependency:
        lines.append(f'import "{dep}";')
    if fd.dependency:
        lines.append("")
    for message in fd.message_type:
        lines += render_message(message, 0) + [""]
    for enum in fd.enum_type:
        lines += render_enum(enum, 0) + [""]
    for service in fd.service:
        lines.append(f"service {service.name} {{")
        for method in service.method:
            cs = "stream " if method.client_streaming else ""
            ss = "stream " if method.server_streaming else ""
            lines.append(f"  rpc {method.name}({cs}{method.input_type}) "
                         f"returns ({ss}{method.output_type});")
        lines.append("}")
        lines.append("")
    return "\n".join(lines)


def normalised(fd):
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(fd)
    copy.ClearField("options")
    copy.ClearField("source_code_info")
    for message in _all_messages(copy.message_type):
        for field in message.field:
            field.ClearField("json_name")
    return copy


def _all_messages(messages):
    for message in messages:
        yield message
        yield from _all_messages(message.nested_type)


def main():
    envd_dir, out_dir = map(pathlib.Path, sys.argv[1:3])
    out_dir.mkdir(parents=True, exist_ok=True)
    originals = {}
    for py_file in sorted(envd_dir.glob("*/*_pb.py")):
        fd = descriptor_pb2.FileDescriptorProto.FromString(embedded_descriptor(py_file))
        target = out_dir / fd.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render_file(fd, py_file.relative_to(envd_dir.parent).as_posix()))
        originals[fd.name] = fd
        print(f"wrote {target}")
    # Round trip: compile what was written and compare with the embedded descriptors.
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "set.pb"
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{out_dir}",
                        f"--descriptor_set_out={out}", *originals], check=True)
        compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    for fd in compiled.file:
        if normalised(fd) != normalised(originals[fd.name]):
            raise SystemExit(f"{fd.name}: recompiled descriptor differs from the embedded one")
    print("round trip: descriptors match")


if __name__ == "__main__":
    main()
