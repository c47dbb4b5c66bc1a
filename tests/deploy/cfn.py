"""A CloudFormation template as it would deploy, for tests: parameters in, resolved values out.

The template is read by cfn-lint's own decoder, so `!Ref`, `!Sub` and friends arrive as
CloudFormation spells them ({"Ref": ...}, {"Fn::Sub": ...}). Only the functions the fleet
template uses are evaluated. A resource's attributes (`!GetAtt`) and a resource's `!Ref`
become placeholder strings such as "<TargetGroup>": their values exist only in AWS.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cfnlint.decode import decode

NO_VALUE = object()
_SUB = re.compile(r"\$\{([^}]+)\}")


def load(path: Path) -> dict:
    template, matches = decode(str(path))
    if matches:
        raise ValueError(f"{path}: {[str(m) for m in matches]}")
    return template


def pseudo(region: str, account: str) -> dict[str, str]:
    return {
        "AWS::Region": region,
        "AWS::AccountId": account,
        "AWS::URLSuffix": "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com",
        "AWS::Partition": "aws-cn" if region.startswith("cn-") else "aws",
        "AWS::StackName": "sniproxy",
        "AWS::StackId": f"arn:{'aws-cn' if region.startswith('cn-') else 'aws'}:cloudformation:{region}:{account}:"
                        "stack/sniproxy/51af3dc0-da77-11e4-872e-1234567db123",
    }


class Stack:
    """The template with parameters given: resources whose condition holds, values resolved."""

    def __init__(self, template: dict, parameters: dict[str, Any], region: str = "us-east-1",
                 account: str = "123456789012"):
        self.template = template
        self.params = self._parameters(parameters)
        self.pseudo = pseudo(region, account)
        self._conditions: dict[str, bool] = {}
        for name, rule in template.get("Rules", {}).items():
            if self.resolve(rule.get("RuleCondition", True)):
                for assertion in rule["Assertions"]:
                    assert self.resolve(assertion["Assert"]), f"rule {name}: {assertion['AssertDescription']}"

    def _parameters(self, given: dict[str, Any]) -> dict[str, Any]:
        """Given values over defaults, checked against AllowedPattern/AllowedValues/MinValue as
        CloudFormation would, so a test cannot deploy what AWS would refuse."""
        declared = self.template["Parameters"]
        unknown = set(given) - set(declared)
        assert not unknown, f"not parameters of the template: {unknown}"
        values = {}
        for name, spec in declared.items():
            value = given.get(name, spec.get("Default"))
            assert value is not None, f"parameter {name} is required"
            if spec["Type"] == "CommaDelimitedList":
                value = value.split(",") if isinstance(value, str) else list(value)
            if "AllowedPattern" in spec:
                assert re.fullmatch(spec["AllowedPattern"], str(value)), (name, value)
            if "AllowedValues" in spec:
                assert str(value) in spec["AllowedValues"], (name, value)
            if spec["Type"] == "Number":
                assert float(spec.get("MinValue", "-inf")) <= float(value) <= float(spec.get("MaxValue", "inf")), (name, value)
                value = str(value)
            values[name] = value
        return values

    def condition(self, name: str) -> bool:
        if name not in self._conditions:
            self._conditions[name] = bool(self.resolve(self.template["Conditions"][name]))
        return self._conditions[name]

    @property
    def resources(self) -> dict[str, dict]:
        """Logical id -> {"Type": ..., "Properties": resolved}, for the resources created."""
        out = {}
        for name, resource in self.template["Resources"].items():
            if "Condition" in resource and not self.condition(resource["Condition"]):
                continue
            out[name] = {"Type": resource["Type"], "Properties": self.resolve(resource.get("Properties", {}))}
        return out

    def attribute(self, name: str, key: str) -> Any:
        """A resource attribute outside Properties (CreationPolicy, UpdatePolicy, ...), resolved."""
        return self.resolve(self.template["Resources"][name].get(key))

    def of_type(self, kind: str) -> dict[str, dict]:
        return {name: r["Properties"] for name, r in self.resources.items() if r["Type"] == kind}

    def one(self, kind: str) -> dict:
        found = self.of_type(kind)
        assert len(found) == 1, (kind, list(found))
        return next(iter(found.values()))

    @property
    def outputs(self) -> dict[str, Any]:
        return {name: self.resolve(out["Value"]) for name, out in self.template["Outputs"].items()}

    def ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.params:
            return self.params[name]
        assert name in self.template["Resources"], f"Ref to unknown {name}"
        return f"<{name}>"

    def sub(self, text: str, variables: dict[str, Any]) -> str:
        def one(match: re.Match) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(variables[name])
            if "." in name and not name.startswith("AWS::"):
                return f"<{name}>"  # a resource attribute
            value = self.ref(name)
            assert isinstance(value, str), (name, value)
            return value

        return _SUB.sub(one, text)

    def resolve(self, node: Any) -> Any:
        if isinstance(node, list):
            items = [self.resolve(item) for item in node]
            return [item for item in items if item is not NO_VALUE]
        if not isinstance(node, dict):
            return str(node) if isinstance(node, str) else node
        if len(node) == 1:
            (key, arg), = node.items()
            if key == "Ref":
                return self.ref(arg)
            if key == "Condition":
                return self.condition(arg)
            if key.startswith("Fn::"):
                return self._function(key, arg)
        out = {}
        for key, value in node.items():
            value = self.resolve(value)
            if value is not NO_VALUE:
                out[str(key)] = value
        return out

    def _function(self, key: str, arg: Any) -> Any:
        if key == "Fn::Sub":
            text, variables = (arg, {}) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))
            return self.sub(text, variables)
        if key == "Fn::Join":
            return str(arg[0]).join(self.resolve(arg[1]))
        if key == "Fn::If":
            return self.resolve(arg[1] if self.condition(arg[0]) else arg[2])
        if key == "Fn::Equals":
            left, right = self.resolve(arg)
            return left == right
        if key == "Fn::Not":
            return not self.resolve(arg[0])
        if key == "Fn::And":
            return all(self.resolve(arg))
        if key == "Fn::Or":
            return any(self.resolve(arg))
        if key == "Fn::Contains":
            values, value = self.resolve(arg)
            return value in values
        if key == "Fn::Select":
            index, values = self.resolve(arg)
            return values[int(index)]
        if key == "Fn::Split":
            separator, text = self.resolve(arg)
            return text.split(separator)
        if key == "Fn::Base64":
            return self.resolve(arg)  # kept as text, for the tests to read
        if key == "Fn::GetAtt":
            return "<{}>".format(arg if isinstance(arg, str) else ".".join(arg))
        raise NotImplementedError(key)
