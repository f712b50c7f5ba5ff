//! Model definitions (graphs of ops over stored weights) and the three
//! reference models.

pub mod cpu;
pub mod graph;
pub mod llama;
pub mod reference;
pub mod synthetic;
pub mod weights;

pub use graph::{Act, Graph, Op, TensorDecl};
