"""What a ``.skops`` file may contain before Bastion lets skops build it.

skops' own defaults trust every scikit-learn estimator (``FunctionTransformer``
included) and every NumPy/SciPy ufunc, and ``load(trusted=...)`` only *adds* to them.
Types from trusted namespaces can still be chained into code execution (a
``FunctionTransformer`` calling ``numpy.testing``'s ``runstring`` on a string built by
``numpy.full_like`` and ``numpy.take``), so Bastion reads the file's ``schema.json``
first, before anything is constructed, and accepts only:

- objects of an explicit list of scikit-learn classes (:data:`ALLOWED_SKLEARN`, named by
  their public import path and resolved to the exact dotted name of the installed
  version) and the few internal types those classes hold (trees, losses, optimizers);
- arrays, dtypes and scalars of NumPy, NumPy random states, plain containers;
- type objects only when they are NumPy scalar types or ``int``/``float``/``str``/``bool``.

Functions, methods, ``functools.partial`` objects and operators as values are always
refused, whatever module they come from, and so is every type not listed: the error
names it. Only then is the file loaded with ``skops.io.load(trusted=[...])`` so skops'
own audit runs too.
"""

from __future__ import annotations

import importlib
import io
import json
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from bastion.errors import ModelError

#: scikit-learn classes a .skops file may hold, by public import path
ALLOWED_SKLEARN: tuple[str, ...] = (
    "sklearn.pipeline.Pipeline",
    "sklearn.compose.ColumnTransformer",
    "sklearn.linear_model.LogisticRegression",
    "sklearn.linear_model.SGDClassifier",
    "sklearn.linear_model.RidgeClassifier",
    "sklearn.neural_network.MLPClassifier",
    "sklearn.ensemble.RandomForestClassifier",
    "sklearn.ensemble.ExtraTreesClassifier",
    "sklearn.ensemble.GradientBoostingClassifier",
    "sklearn.tree.DecisionTreeClassifier",
    "sklearn.tree.DecisionTreeRegressor",
    "sklearn.tree.ExtraTreeClassifier",
    "sklearn.tree.ExtraTreeRegressor",
    "sklearn.dummy.DummyClassifier",
    "sklearn.dummy.DummyRegressor",
    "sklearn.naive_bayes.GaussianNB",
    "sklearn.svm.SVC",
    "sklearn.svm.LinearSVC",
    "sklearn.decomposition.PCA",
    "sklearn.preprocessing.StandardScaler",
    "sklearn.preprocessing.MinMaxScaler",
    "sklearn.preprocessing.MaxAbsScaler",
    "sklearn.preprocessing.RobustScaler",
    "sklearn.preprocessing.Normalizer",
    "sklearn.preprocessing.OneHotEncoder",
    "sklearn.preprocessing.LabelBinarizer",
    "sklearn.preprocessing.LabelEncoder",
    # internal state of the classes above
    "sklearn.tree._tree.Tree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn._loss.link.Interval",
    "sklearn._loss.link.IdentityLink",
    "sklearn._loss.link.LogitLink",
    "sklearn._loss.link.HalfLogitLink",
    "sklearn._loss.link.MultinomialLogit",
    "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.loss.HalfMultinomialLoss",
    "sklearn._loss.loss.ExponentialLoss",
    "sklearn._loss.loss.HalfSquaredError",
    "sklearn._loss._loss.CyHalfBinomialLoss",
    "sklearn._loss._loss.CyHalfMultinomialLoss",
    "sklearn._loss._loss.CyExponentialLoss",
    "sklearn._loss._loss.CyHalfSquaredError",
)

_BUILTIN_VALUES = ("builtins.dict", "builtins.list", "builtins.tuple", "builtins.set",
                   "builtins.str", "builtins.int", "builtins.float", "builtins.bool",
                   "builtins.NoneType", "builtins.slice", "builtins.bytes",
                   "collections.OrderedDict")
_BUILTIN_TYPES = ("builtins.int", "builtins.float", "builtins.str", "builtins.bool")
_NUMPY_OTHER = ("numpy.ndarray", "numpy.dtype", "numpy.random.mtrand.RandomState",
                "numpy.random._generator.Generator")

#: skops loaders that rebuild a callable: never accepted
CALLABLE_LOADERS = frozenset({"FunctionNode", "PartialNode", "MethodNode",
                              "OperatorFuncNode"})
#: skops loaders whose node is checked against the allowed types
VALUE_LOADERS = frozenset({"DictNode", "ListNode", "TupleNode", "SetNode", "JsonNode",
                           "NdArrayNode", "DTypeNode", "ObjectNode", "TreeNode", "LossNode",
                           "RandomStateNode", "RandomGeneratorNode", "SliceNode",
                           "BytesNode", "TypeNode"})

#: largest schema.json Bastion reads (a guard against zip bombs)
MAX_SCHEMA_BYTES = 64 * 1024 * 1024


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@lru_cache(maxsize=1)
def numpy_scalar_types() -> frozenset[str]:
    """Exact dotted names of NumPy's scalar types (``numpy.float64``, ...)."""
    import numpy as np

    names = set()
    for t in set(np.sctypeDict.values()):
        mod = t.__module__
        names.add(f"{mod}.{t.__name__}")
    return frozenset(names)


@lru_cache(maxsize=1)
def allowed_types() -> frozenset[str]:
    """Exact dotted names of every class a ``.skops`` object node may have."""
    names: set[str] = set(_BUILTIN_VALUES) | set(_NUMPY_OTHER) | numpy_scalar_types()
    for public in ALLOWED_SKLEARN:
        mod, _, attr = public.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue  # not in this scikit-learn version
        names.add(_dotted(cls))
        names.add(public)
    return frozenset(names)


def _nodes(obj: Any) -> Iterator[dict[str, Any]]:
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if "__loader__" in o:
                yield o
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def _read_schema(data: bytes, path: Path) -> Any:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            info = z.getinfo("schema.json")
            if info.file_size > MAX_SCHEMA_BYTES:
                raise ModelError(f"{path} has a {info.file_size} byte schema, larger than "
                                 f"Bastion reads ({MAX_SCHEMA_BYTES})",
                                 hint="save a smaller model")
            return json.loads(z.read(info).decode("utf-8"))
    except ModelError:
        raise
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError,
            json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"{path} is not a valid skops file ({type(exc).__name__})",
                         hint="the file is corrupt; save the model again") from None


def refused_types(data: bytes, path: str | Path = "<skops>") -> list[str]:
    """Everything in the skops file ``data`` (read from ``path``) that Bastion will not
    build, described in words (``"function numpy.take"``); empty when it may be loaded.

    Reads only ``schema.json``: nothing in the file is imported or constructed.
    """
    schema = _read_schema(data, Path(path))
    allowed = allowed_types()
    type_values = set(_BUILTIN_TYPES) | numpy_scalar_types() | {"numpy.dtype"}
    refused: set[str] = set()
    for node in _nodes(schema):
        loader = str(node.get("__loader__"))
        name = f"{node.get('__module__')}.{node.get('__class__')}"
        if loader == "CachedNode":  # a reference to a node checked where it is defined
            continue
        if loader in CALLABLE_LOADERS:
            refused.add(f"function {name}")
        elif loader not in VALUE_LOADERS:
            refused.add(f"{name} (skops loader {loader})")
        elif loader == "TypeNode":
            if name not in type_values:
                refused.add(f"type object {name}")
        elif name not in allowed:
            refused.add(name)
    return sorted(refused)
