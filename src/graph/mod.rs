//! A read-only graph view of a model: every graph (the main one and each If/Loop/Scan body) as
//! a petgraph `StableDiGraph` over its nodes, with producers and consumers per value,
//! initializers, Constant values and value infos, and a deterministic topological order
//! (ties keep the original node order). Rewrites read it to decide and then edit the proto.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

use petgraph::stable_graph::{NodeIndex, StableDiGraph};

use crate::onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};

/// Where a graph sits in the model: the chain of (node index, attribute name, index in
/// `graphs` or 0 for `g`) from the main graph down. Empty for the main graph.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct GraphLoc(pub Vec<(usize, String, usize)>);

impl GraphLoc {
    pub fn is_main(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether this graph and `other` are bodies of the two branches of one If (at any depth
    /// below them): one run executes at most one of them.
    pub fn alternative_to(&self, other: &GraphLoc) -> bool {
        self.0
            .iter()
            .zip(&other.0)
            .find(|(a, b)| a != b)
            .is_some_and(|((na, aa, _), (nb, ab, _))| {
                na == nb && aa != ab && [aa, ab].iter().all(|a| a.ends_with("_branch"))
            })
    }

    /// The graph at this location.
    pub fn get<'m>(&self, model: &'m ModelProto) -> Option<&'m GraphProto> {
        let mut g = model.graph.as_ref()?;
        for (node, attr, i) in &self.0 {
            let a = g
                .node
                .get(*node)?
                .attribute
                .iter()
                .find(|a| a.name() == attr)?;
            g =
                a.g.as_ref()
                    .filter(|_| *i == 0 && a.graphs.is_empty())
                    .or(a.graphs.get(*i))?;
        }
        Some(g)
    }

    /// The graph at this location, mutably.
    pub fn get_mut<'m>(&self, model: &'m mut ModelProto) -> Option<&'m mut GraphProto> {
        let mut g = model.graph.as_mut()?;
        for (node, attr, i) in &self.0 {
            let a = g
                .node
                .get_mut(*node)?
                .attribute
                .iter_mut()
                .find(|a| a.name() == attr)?;
            g = if a.graphs.is_empty() {
                a.g.as_mut()?
            } else {
                a.graphs.get_mut(*i)?
            };
        }
        Some(g)
    }
}

/// One graph of the model, indexed.
#[derive(Debug)]
pub struct GraphView {
    pub loc: GraphLoc,
    /// Index of the enclosing graph in `ModelGraph::graphs` (None for the main graph).
    pub parent: Option<usize>,
    /// Edges run producer -> consumer and carry the value name. Node weights are indices
    /// into the proto's `node` list.
    pub dag: StableDiGraph<usize, String>,
    pub node_ix: Vec<NodeIndex>,
    pub producer: HashMap<String, usize>,
    /// Consumers of each value, in node order; a node whose subgraph reads a value of this
    /// graph counts as its consumer.
    pub consumers: HashMap<String, Vec<usize>>,
    pub initializers: HashMap<String, usize>,
    pub value_info: HashMap<String, usize>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// Every graph of a model, main graph first, subgraphs after their parents.
#[derive(Debug)]
pub struct ModelGraph {
    pub graphs: Vec<GraphView>,
}

impl ModelGraph {
    pub fn build(model: &ModelProto) -> Self {
        let mut graphs = Vec::new();
        if let Some(g) = model.graph.as_ref() {
            build_rec(g, GraphLoc::default(), None, &mut graphs);
        }
        ModelGraph { graphs }
    }

    pub fn main(&self) -> Option<&GraphView> {
        self.graphs.first()
    }
}

/// The first value that one graph assigns twice, said as such: two nodes writing it, two
/// initializers (dense or sparse) of its name, or an initializer that a node also writes. An
/// ONNX graph assigns each value once; the rewrites find a value's one producer, and a change
/// to one of two initializers would be lost wherever the other is read (onnxruntime 1.31
/// reads the last, with a warning). Initializers without a name, which nothing can read, are
/// not counted.
pub fn assigned_twice(model: &ModelProto) -> Option<String> {
    use crate::onnx::pb_ext::NodeExt;
    fn rec(g: &GraphProto) -> Option<String> {
        let mut inits: HashMap<&str, usize> = HashMap::new();
        let names = g.initializer.iter().map(|t| t.name()).chain(
            g.sparse_initializer
                .iter()
                .filter_map(|s| s.values.as_ref())
                .map(|t| t.name()),
        );
        for name in names.filter(|n| !n.is_empty()) {
            let n = inits.entry(name).or_default();
            *n += 1;
            if *n == 2 {
                return Some(format!(
                    "graph '{}' has two initializers named '{name}'; an ONNX graph assigns each value once (onnxruntime reads the last copy; a rewrite of one copy could be lost)",
                    g.name()
                ));
            }
        }
        let mut by: HashMap<&str, &NodeProto> = HashMap::new();
        for n in &g.node {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if inits.contains_key(o.as_str()) {
                    return Some(format!(
                        "value '{o}' is both an initializer and written by node {}; an ONNX graph assigns each value once",
                        n.label()
                    ));
                }
                if let Some(first) = by.insert(o, n) {
                    let second = if std::ptr::eq(first, n) {
                        format!("{} again", n.label())
                    } else {
                        n.label()
                    };
                    return Some(format!(
                        "value '{o}' is written by two nodes ({} and {second}); an ONNX graph assigns each value once",
                        first.label()
                    ));
                }
            }
        }
        g.node
            .iter()
            .flat_map(|n| &n.attribute)
            .flat_map(|a| a.g.iter().chain(&a.graphs))
            .find_map(rec)
    }
    rec(model.graph.as_ref()?)
}

fn build_rec(g: &GraphProto, loc: GraphLoc, parent: Option<usize>, out: &mut Vec<GraphView>) {
    let me = out.len();
    out.push(GraphView::new(g, loc.clone(), parent));
    for (ni, node) in g.node.iter().enumerate() {
        for a in &node.attribute {
            if let Some(sub) = a.g.as_ref() {
                let mut l = loc.clone();
                l.0.push((ni, a.name().to_string(), 0));
                build_rec(sub, l, Some(me), out);
            }
            for (gi, sub) in a.graphs.iter().enumerate() {
                let mut l = loc.clone();
                l.0.push((ni, a.name().to_string(), gi));
                build_rec(sub, l, Some(me), out);
            }
        }
    }
}

impl GraphView {
    fn new(g: &GraphProto, loc: GraphLoc, parent: Option<usize>) -> Self {
        let mut dag = StableDiGraph::new();
        let node_ix: Vec<NodeIndex> = (0..g.node.len()).map(|i| dag.add_node(i)).collect();
        let mut producer = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                producer.insert(o.clone(), i);
            }
        }
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            let mut reads: BTreeSet<&str> = n
                .input
                .iter()
                .filter(|s| !s.is_empty())
                .map(String::as_str)
                .collect();
            for a in &n.attribute {
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    reads.extend(outer_reads(sub));
                }
            }
            for v in reads {
                consumers.entry(v.to_string()).or_default().push(i);
                if let Some(&p) = producer.get(v) {
                    dag.add_edge(node_ix[p], node_ix[i], v.to_string());
                }
            }
        }
        GraphView {
            loc,
            parent,
            dag,
            node_ix,
            producer,
            consumers,
            initializers: g
                .initializer
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name().to_string(), i))
                .collect(),
            value_info: g
                .value_info
                .iter()
                .enumerate()
                .map(|(i, v)| (v.name().to_string(), i))
                .collect(),
            inputs: g.input.iter().map(|v| v.name().to_string()).collect(),
            outputs: g.output.iter().map(|v| v.name().to_string()).collect(),
        }
    }

    /// Node indices in a topological order; among ready nodes the earliest in the proto
    /// goes first, so the order is deterministic and equals the original when it was valid.
    pub fn topo_order(&self) -> Vec<usize> {
        let n = self.node_ix.len();
        let mut indeg = vec![0usize; n];
        for e in self.dag.edge_indices() {
            if let Some((_, b)) = self.dag.edge_endpoints(e) {
                indeg[self.dag[b]] += 1;
            }
        }
        let mut ready: BinaryHeap<Reverse<usize>> =
            (0..n).filter(|&i| indeg[i] == 0).map(Reverse).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(Reverse(i)) = ready.pop() {
            order.push(i);
            for j in self.dag.neighbors(self.node_ix[i]) {
                let j = self.dag[j];
                indeg[j] -= 1;
                if indeg[j] == 0 {
                    ready.push(Reverse(j));
                }
            }
        }
        // A cycle (invalid model) leaves nodes out: keep them, in their original order.
        if order.len() < n {
            let seen: HashSet<usize> = order.iter().copied().collect();
            order.extend((0..n).filter(|i| !seen.contains(i)));
        }
        order
    }

    pub fn consumers_of(&self, value: &str) -> &[usize] {
        self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn is_graph_output(&self, value: &str) -> bool {
        self.outputs.iter().any(|o| o == value)
    }
}

/// Values a subgraph reads from enclosing scopes (used but neither produced, declared as an
/// input, nor an initializer inside it), including those its own subgraphs read.
pub fn outer_reads(g: &GraphProto) -> BTreeSet<&str> {
    let mut local: HashSet<&str> = g.input.iter().map(|v| v.name()).collect();
    local.extend(g.initializer.iter().map(|t| t.name()));
    local.extend(
        g.sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref().map(|v| v.name())),
    );
    for n in &g.node {
        local.extend(n.output.iter().map(String::as_str));
    }
    let mut reads = BTreeSet::new();
    for n in &g.node {
        for i in n.input.iter().filter(|s| !s.is_empty()) {
            if !local.contains(i.as_str()) {
                reads.insert(i.as_str());
            }
        }
        for a in &n.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                reads.extend(outer_reads(sub).into_iter().filter(|v| !local.contains(v)));
            }
        }
    }
    reads
}

/// A constant value found by following a node input back to where it is defined.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConstSource {
    /// `graphs[graph].initializer[index]`.
    Initializer { graph: usize, index: usize },
    /// The `value` attribute of Constant node `graphs[graph].node[node]`.
    Constant { graph: usize, node: usize },
}

impl ModelGraph {
    /// Where `value`, as seen from graph `gi`, is defined as a constant: an initializer of that
    /// graph or an enclosing one, or a Constant node.
    pub fn const_source(&self, model: &ModelProto, gi: usize, value: &str) -> Option<ConstSource> {
        let mut cur = Some(gi);
        while let Some(g) = cur {
            let view = &self.graphs[g];
            if let Some(&p) = view.producer.get(value) {
                let proto = view.loc.get(model)?;
                let node = &proto.node[p];
                return (node.op_type() == "Constant" && node.domain().is_empty())
                    .then_some(ConstSource::Constant { graph: g, node: p });
            }
            if let Some(&index) = view.initializers.get(value) {
                // A graph input of the same name overrides the initializer: not constant.
                if view.inputs.iter().any(|i| i == value) {
                    return None;
                }
                return Some(ConstSource::Initializer { graph: g, index });
            }
            if view.inputs.iter().any(|i| i == value) {
                return None;
            }
            cur = view.parent;
        }
        None
    }

    /// `const_source`, also where `value` is the output of an Identity of a constant, in the
    /// graph that defines `value` or in an enclosing one (TorchScript reads a merged parameter
    /// through an Identity at the top of the main graph, named after the parameter).
    pub fn const_source_through_identity(
        &self,
        model: &ModelProto,
        gi: usize,
        value: &str,
    ) -> Option<ConstSource> {
        let mut cur = Some(gi);
        while let Some(g) = cur {
            let view = &self.graphs[g];
            if let Some(&p) = view.producer.get(value) {
                let node = view.loc.get(model)?.node.get(p)?;
                return if node.op_type() == "Identity" && node.domain().is_empty() {
                    self.const_source(model, g, node.input.first()?)
                } else {
                    self.const_source(model, g, value)
                };
            }
            if view.initializers.contains_key(value) || view.inputs.iter().any(|i| i == value) {
                return self.const_source(model, g, value);
            }
            cur = view.parent;
        }
        None
    }

    /// The tensor behind a constant source.
    pub fn const_tensor<'m>(
        &self,
        model: &'m ModelProto,
        src: &ConstSource,
    ) -> Option<&'m TensorProto> {
        match *src {
            ConstSource::Initializer { graph, index } => {
                self.graphs[graph].loc.get(model)?.initializer.get(index)
            }
            ConstSource::Constant { graph, node } => self.graphs[graph]
                .loc
                .get(model)?
                .node
                .get(node)?
                .attribute
                .iter()
                .find(|a| a.name() == "value")?
                .t
                .as_ref(),
        }
    }

    /// Every node of the main graph and of its subgraphs, as (graph, node index, node).
    pub fn nodes<'m>(
        &'m self,
        model: &'m ModelProto,
    ) -> impl Iterator<Item = (usize, usize, &'m NodeProto)> + 'm {
        self.graphs
            .iter()
            .enumerate()
            .filter_map(move |(gi, view)| view.loc.get(model).map(|g| (gi, g)))
            .flat_map(|(gi, g)| g.node.iter().enumerate().map(move |(ni, n)| (gi, ni, n)))
    }

    /// The node proto at (graph, index).
    pub fn node<'m>(
        &self,
        model: &'m ModelProto,
        graph: usize,
        node: usize,
    ) -> Option<&'m NodeProto> {
        self.graphs[graph].loc.get(model)?.node.get(node)
    }

    /// The value info declared for `value` in graph `gi` (value_info, inputs or outputs).
    pub fn value_info<'m>(
        &self,
        model: &'m ModelProto,
        gi: usize,
        value: &str,
    ) -> Option<&'m ValueInfoProto> {
        let g = self.graphs[gi].loc.get(model)?;
        g.value_info
            .iter()
            .chain(g.input.iter())
            .chain(g.output.iter())
            .find(|v| v.name() == value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two initializers of one name are a value assigned twice; two without a name, which
    /// nothing can read, are not.
    #[test]
    fn unnamed_initializers_are_not_assigned_twice() {
        let init = |name: &str| crate::onnx::pb::TensorProto {
            name: Some(name.into()),
            ..Default::default()
        };
        let model = |inits: Vec<crate::onnx::pb::TensorProto>| ModelProto {
            graph: Some(GraphProto {
                name: Some("g".into()),
                initializer: inits,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(assigned_twice(&model(vec![init(""), init("")])), None);
        let twice = assigned_twice(&model(vec![init("W"), init("W")])).unwrap_or_default();
        assert!(
            twice.starts_with("graph 'g' has two initializers named 'W'"),
            "{twice}"
        );
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            op_type: Some(op.into()),
            ..Default::default()
        }
    }

    /// An If node on `cond` whose then-branch is `body`.
    fn if_then(body: GraphProto) -> NodeProto {
        NodeProto {
            input: vec!["cond".into()],
            output: vec!["out".into()],
            op_type: Some("If".into()),
            attribute: vec![crate::onnx::pb::AttributeProto {
                name: Some("then_branch".into()),
                g: Some(body),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn topo_order_is_stable_and_repairs_order() {
        // Sorted already: the original order comes back.
        let g = GraphProto {
            node: vec![
                node("Relu", &["x"], "a"),
                node("Relu", &["x"], "b"),
                node("Add", &["a", "b"], "c"),
            ],
            ..Default::default()
        };
        assert_eq!(
            GraphView::new(&g, GraphLoc::default(), None).topo_order(),
            vec![0, 1, 2]
        );
        // A consumer listed before its producer moves after it; independent nodes keep order.
        let g = GraphProto {
            node: vec![
                node("Add", &["a", "b"], "c"),
                node("Relu", &["x"], "a"),
                node("Relu", &["x"], "b"),
            ],
            ..Default::default()
        };
        let view = GraphView::new(&g, GraphLoc::default(), None);
        assert_eq!(view.topo_order(), vec![1, 2, 0]);
        assert_eq!(view.consumers_of("a"), &[0]);
        assert_eq!(view.producer.get("c"), Some(&0));
    }

    #[test]
    fn subgraph_reads_count_as_consumers_of_the_outer_value() {
        let body = GraphProto {
            node: vec![node("Identity", &["w"], "z")],
            ..Default::default()
        };
        let iff = if_then(body);
        let model = ModelProto {
            graph: Some(GraphProto {
                node: vec![node("Relu", &["x"], "w"), iff],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mg = ModelGraph::build(&model);
        assert_eq!(mg.graphs.len(), 2);
        assert_eq!(mg.graphs[0].consumers_of("w"), &[1]);
        assert_eq!(mg.graphs[1].parent, Some(0));
        assert!(mg.graphs[1].loc.get(&model).is_some());
    }

    /// An If's then and else bodies (at any depth below them) are alternatives; a body and
    /// the main graph, two bodies of different Ifs, or a Loop body and anything are not.
    #[test]
    fn only_the_two_branches_of_one_if_are_alternatives() {
        let loc = |steps: &[(usize, &str)]| {
            GraphLoc(steps.iter().map(|&(n, a)| (n, a.to_string(), 0)).collect())
        };
        let then = loc(&[(3, "then_branch")]);
        let other = loc(&[(3, "else_branch")]);
        assert!(then.alternative_to(&other));
        assert!(loc(&[(3, "then_branch"), (0, "body")]).alternative_to(&other));
        assert!(!then.alternative_to(&then));
        assert!(!then.alternative_to(&GraphLoc::default()));
        assert!(!then.alternative_to(&loc(&[(4, "else_branch")])));
        assert!(!loc(&[(3, "body")]).alternative_to(&loc(&[(3, "then_branch")])));
    }

    /// A value an If body reads from the main graph through an Identity of an initializer is
    /// that initializer; another producer is no constant.
    #[test]
    fn constants_are_followed_through_an_outer_identity() {
        let body = GraphProto {
            node: vec![node("Add", &["x", "fc_1.bias"], "y")],
            ..Default::default()
        };
        let iff = if_then(body);
        let model = ModelProto {
            graph: Some(GraphProto {
                node: vec![
                    node("Identity", &["fc.bias"], "fc_1.bias"),
                    node("Relu", &["x"], "r"),
                    iff,
                ],
                initializer: vec![TensorProto {
                    name: Some("fc.bias".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mg = ModelGraph::build(&model);
        let init = Some(ConstSource::Initializer { graph: 0, index: 0 });
        assert_eq!(mg.const_source(&model, 1, "fc_1.bias"), None);
        assert_eq!(
            mg.const_source_through_identity(&model, 1, "fc_1.bias"),
            init
        );
        assert_eq!(mg.const_source_through_identity(&model, 1, "fc.bias"), init);
        assert_eq!(mg.const_source_through_identity(&model, 1, "r"), None);
        assert_eq!(mg.const_source_through_identity(&model, 1, "nothing"), None);
    }
}
