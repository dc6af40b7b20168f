//! Agent crate: layerd and layerctl land with the agent issue.
