//! The one way every aggregate here meets [`cqrs_es::Aggregate`]: handling
//! a command writes the events its pure `decide` returns, and applying an
//! event is its `apply_event`.

/// Implements [`cqrs_es::Aggregate`] for `$aggregate` through its
/// `decide(&self, command) -> Result<Vec<event>, error>` and
/// `apply_event(&mut self, event)`, with no services.
macro_rules! decided_by {
    ($aggregate:ty, $type_name:literal, $command:ty, $event:ty, $error:ty) => {
        impl cqrs_es::Aggregate for $aggregate {
            const TYPE: &'static str = $type_name;
            type Command = $command;
            type Event = $event;
            type Error = $error;
            type Services = ();

            async fn handle(
                &mut self,
                command: Self::Command,
                _services: &Self::Services,
                sink: &cqrs_es::event_sink::EventSink<Self>,
            ) -> Result<(), Self::Error> {
                for event in self.decide(command)? {
                    sink.write(event, self).await;
                }
                Ok(())
            }

            fn apply(&mut self, event: Self::Event) {
                self.apply_event(event);
            }
        }
    };
}

pub(crate) use decided_by;
